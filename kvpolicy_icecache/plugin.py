"""Entry point of the IceCache plugin (group ``kvpolicy``): the DCI-tree index, the IceCache selector and the
presets (which load pages with the core's ``bulk_load`` transfer)."""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_indexes():
    from kvpolicy_icecache.dci_tree_index import DCITreeIndex

    return [DCITreeIndex]


@hookimpl
def kvpolicy_register_selectors():
    from kvpolicy_icecache.icecache_selector import IceCacheSelector

    return [IceCacheSelector]


@hookimpl
def kvpolicy_register_presets():
    return {
        # IceCache as the reference runs it: first two layers dense, DCI-tree pages, head-specific retrieval
        "icecache": {"selector": {"name": "icecache"}, "index": {"name": "dci_tree"}, "transfer": "bulk_load",
                     "dense_layers": [0, 1]},
        # the paper's configuration, frozen: `icecache` may take the options that win on the accuracy grid (issue 22),
        # this one stays as the paper runs it (16-token pages, 32 + 32 sink/window tokens, 16 + 16 below 128,
        # uniform per-head budgets, interleaved GQA ranks)
        "icecache-paper": {"selector": {"name": "icecache"}, "index": {"name": "dci_tree"}, "transfer": "bulk_load",
                           "dense_layers": [0, 1]},
        # IceCache whose index returns 4x the budget's pages as candidates, re-chosen by their best token's exact
        # score over the GQA group (IceCacheSelector rerank='max'; an accuracy option: it reads the candidates' keys;
        # 'max' beat 'mass' at 128 tokens on the CPU ablation, docs/eval.md)
        "icecache-rerank": {"selector": {"name": "icecache", "rerank": "max"}, "index": {"name": "dci_tree"},
                            "transfer": "bulk_load", "dense_layers": [0, 1]},
        # IceCache(r): anchor layers 2, 5, 8, ... search; the next two reuse the anchor's pages and selection
        "icecache-reuse": {"selector": {"name": "icecache", "reuse": True}, "index": {"name": "dci_tree"},
                           "transfer": "bulk_load", "dense_layers": [0, 1]},
        # IceCache with a GPU index that keeps no key copy (run it as icecache-hostkeys@cuda:uva): centres,
        # projections and page tables on the GPU, keys in pinned CPU memory, read for the scanned pages only
        "icecache-hostkeys": {"selector": {"name": "icecache"}, "index": {"name": "dci_tree", "keys_on_host": True},
                              "transfer": "bulk_load", "dense_layers": [0, 1]},
        # IceCache with a bounded GPU index (run it as icecache-bounded@cuda:uva): every table that grows with the
        # tokens in host memory, build and insertion on the host, and no key copy: the pages are scored from the
        # CPU pool's keys in place (keys_in_pool); the GPU keeps the search mirror (int32 page table, page cells,
        # subtree counts, centre keys: ~3% of the KV bytes at D = 128)
        "icecache-bounded": {"selector": {"name": "icecache"},
                             "index": {"name": "dci_tree", "keys_on_host": True, "tables_on_host": True,
                                       "keys_in_pool": True},
                             "transfer": "bulk_load", "dense_layers": [0, 1]},
        # ablation: DCI-tree pages ranked by the index alone, every layer sparse
        "icecache-index": {"selector": "index_topk", "index": {"name": "dci_tree"}},
    }
