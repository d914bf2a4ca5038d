"""Entry point of the contrib plugin (group ``kvpolicy``): baseline selectors and faiss/hnswlib indexes."""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_indexes():
    from kvpolicy_contrib.indexes import index_classes

    return index_classes()


@hookimpl
def kvpolicy_register_selectors():
    from kvpolicy_contrib.selectors import selector_classes

    return selector_classes()


@hookimpl
def kvpolicy_register_presets():
    from kvpolicy_contrib.selectors import presets

    return presets()
