"""Entry point of the IceCache plugin (group ``kvpolicy``): the DCI-tree index and its presets."""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_indexes():
    from kvpolicy_icecache.dci_tree_index import DCITreeIndex

    return [DCITreeIndex]


@hookimpl
def kvpolicy_register_presets():
    return {
        # DCI-tree pages ranked by the index alone; the full IceCache selector (sink/window/reuse) comes later
        "icecache-index": {"selector": "index_topk", "index": {"name": "dci_tree"}},
    }
