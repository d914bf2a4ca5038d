"""Reference parts shipped with the core: test oracles and baselines, registered by the core's own plugin
(``kvpolicy.reference.plugin``). The reference transfer ``sync`` sits with the other transfers in
``kvpolicy.transfers``."""
