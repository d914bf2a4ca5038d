"""The core's own plugin (loaded through the ``kvpolicy`` entry points): the reference parts, every transfer
(``kvpolicy.transfers``: ``sync``, ``bulk_load``, ``uva``) and the reference presets."""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl

ORACLE_PAGE_SIZES = {"oracle-token": 1, "oracle-p4": 4, "oracle-p8": 8, "oracle-p16": 16}


@hookimpl
def kvpolicy_register_indexes():
    from kvpolicy.reference.exact_index import ExactIndex

    return [ExactIndex]


@hookimpl
def kvpolicy_register_selectors():
    from kvpolicy.reference.full_selector import FullSelector
    from kvpolicy.reference.index_topk_selector import IndexTopKSelector
    from kvpolicy.reference.oracle_selector import OracleSelector
    from kvpolicy.reference.streaming_selector import StreamingSelector

    return [FullSelector, StreamingSelector, OracleSelector, IndexTopKSelector]


@hookimpl
def kvpolicy_register_allocators():
    from kvpolicy.reference.lru_allocator import LRUAllocator

    return [LRUAllocator]


@hookimpl
def kvpolicy_register_transfers():
    from kvpolicy.transfers.bulk_load_transfer import BulkLoadTransfer
    from kvpolicy.transfers.sync_transfer import SyncTransfer
    from kvpolicy.transfers.uva_transfer import UVATransfer

    return [SyncTransfer, BulkLoadTransfer, UVATransfer]


@hookimpl
def kvpolicy_register_presets():
    return {
        "full": {"selector": "full", "index": "exact"},
        "oracle": {"selector": "oracle", "index": "exact"},
        # oracles that split the loss (issue 22): exact top-k by attention mass at page sizes 1 (single tokens),
        # 4, 8 and 16 (= oracle). Sink and window keep their default token counts (16 + 16 below a 128-token
        # budget, 32 + 32 from 128), which Policy.split() converts to pages of each size: the same tokens at
        # every page size, and the same as IceCache's and Quest's 16-token pages, so only the granularity differs.
        **{name: {"selector": "oracle", "index": "exact", "page_size": size} for name, size in ORACLE_PAGE_SIZES.items()},
        "streaming": {"selector": "streaming", "index": "exact"},
        "exact-topk": {"selector": "index_topk", "index": "exact"},
    }
