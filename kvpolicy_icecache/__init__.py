"""IceCache reference plugin (Mao, Wang, Ester, Li, 2026): DCI-tree semantic pages, head-specific
retrieval, incremental insertion and layer reuse. Its presets load pages with the core's ``bulk_load``
transfer (``kvpolicy.transfers``)."""
