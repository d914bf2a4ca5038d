"""Reference parts shipped with the core: test oracles and baselines, registered as the ``reference`` plugin."""
