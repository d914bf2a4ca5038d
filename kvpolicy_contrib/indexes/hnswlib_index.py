"""``hnswlib``: positional pages ranked by the best tokens an hnswlib HNSW graph (space ``'ip'``) finds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kvpolicy.types import SearchParams
from kvpolicy_contrib.indexes._base import LibraryIndex, check_int

__all__ = ["HnswlibIndex"]

_LABEL_LOCKS = 65536  # hnswlib HierarchicalNSW::MAX_LABEL_OPERATION_LOCKS (one std::mutex each)
_MUTEX = 40  # sizeof(std::mutex) on x86-64 Linux


@dataclass(kw_only=True)
class HnswlibIndex(LibraryIndex):
    """Pages are consecutive runs of ``S`` tokens; one ``hnswlib.Index(space='ip')`` per (b, KV head) is a
    token-level HNSW graph over float32 keys (Malkov & Yashunin, TPAMI 2018). A search asks it for each query
    head's top ``m = ceil(k * S * oversample)`` tokens (``knn_query``, distance ``1 - q . k``, best first) and
    ranks pages by their best token found.

    Defaults are hnswlib's (README / ``python_bindings``: ``M`` 16, ``ef_construction`` 200, ``random_seed``
    100, query ``ef`` 10). ``ef`` is ``max(ef_search, m)`` (``SearchParams.ef_search`` overrides), since
    hnswlib returns at most ``ef`` results. ``oversample`` 2, as ``faiss_hnsw``. hnswlib's README warns that
    ``'ip'`` is not a metric (a point need not be its own nearest neighbour); the graph is built on it as is,
    and some low-norm keys are reachable from no query: when a query reaches fewer than ``m`` nodes hnswlib
    raises, and we ask again for ``m/2, m/4, ...`` tokens (only seen with ``m`` close to T, i.e. ``k ~ P``;
    the pages not reached are then topped up as for every back-end).

    **Add**: ``add_items`` with the next ids, after ``resize_index`` to at least twice the capacity when full
    (``O(n ef_construction M log T)``); positional pages. Threads: ``num_threads`` is passed to every
    ``add_items``/``knn_query`` (1: sequential insertion, hence a reproducible graph).

    ``nbytes`` is an estimate from hnswlib's allocation (``hnswalg.h``), per (b, KV head):
    ``capacity * (4 D + (2M + 1) * 4 + 8 label + 8 link pointer + 4 level + 40 lock + 2 visited mark)``
    ``+ count * (M + 1) * 4 / (M - 1)`` (expected upper-level links) ``+ count * 32`` (label hash map)
    ``+ 65536 * 40`` (hnswlib's fixed table of label locks: 2.6 MB per graph).
    """

    name: ClassVar[str] = "hnswlib"
    library: ClassVar[str] = "hnswlib"
    requires: ClassVar[tuple[str, ...]] = ("hnswlib",)
    extra: ClassVar[str] = "hnsw"
    # conformance sweep: recall@8 measured 1.0 on the suite's data and on 10 key seeds
    conformance: ClassVar[dict] = {"min_recall": 0.9}

    oversample: float = 2.0
    M: int = 16
    ef_construction: int = 200
    ef_search: int = 10
    seed: int = 100

    def _check_fields(self) -> None:
        super()._check_fields()
        check_int("M", self.M, 2)
        check_int("ef_construction", self.ef_construction, 1)
        check_int("ef_search", self.ef_search, 1)
        check_int("seed", self.seed, 0)

    def _new_row(self, x: np.ndarray) -> tuple[Any, None]:
        n, d = x.shape
        row = self._lib.Index(space="ip", dim=d)
        row.init_index(max_elements=max(n, 16), ef_construction=self.ef_construction, M=self.M,
                       random_seed=self.seed)
        if n:
            row.add_items(x, np.arange(n), num_threads=self.num_threads)
        return row, None

    def _extend_row(self, row: Any, x: np.ndarray, first_id: int) -> None:
        need = row.get_current_count() + x.shape[0]
        if need > row.get_max_elements():
            row.resize_index(max(need, 2 * row.get_max_elements()))
        row.add_items(x, np.arange(first_id, first_id + x.shape[0]), num_threads=self.num_threads)

    def _search_row(self, row: Any, q: np.ndarray, m: int, params: SearchParams | None) -> np.ndarray:
        ef = params.ef_search if params is not None and params.ef_search is not None else self.ef_search
        check_int("ef_search", ef, 1)
        row.set_ef(max(ef, m))
        out = np.full((q.shape[0], m), -1, dtype=np.int64)
        k = m
        while True:  # hnswlib raises when a query reaches fewer than k nodes; ask for fewer (rare, k ~ T)
            try:
                labels, _ = row.knn_query(q, k=k, num_threads=self.num_threads)
                break
            except RuntimeError:
                if k == 1:
                    return out
                k //= 2
        out[:, :k] = labels
        return out

    def _row_nbytes(self, row: Any) -> int:
        cap, n, d, M = row.get_max_elements(), row.get_current_count(), row.dim, self.M
        per_slot = 4 * d + (2 * M + 1) * 4 + 8 + 8 + 4 + _MUTEX + 2
        return int(cap * per_slot + n * (M + 1) * 4 / (M - 1) + n * 32 + _LABEL_LOCKS * _MUTEX)
