"""The core's own plugin (loaded through the ``kvpolicy`` entry points): the reference parts, every transfer
(``kvpolicy.transfers``: ``sync``, ``bulk_load``, ``uva``) and the reference presets."""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl


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
        "streaming": {"selector": "streaming", "index": "exact"},
        "exact-topk": {"selector": "index_topk", "index": "exact"},
    }
