"""``faiss_hnsw``: positional pages ranked by the best tokens an HNSW graph (faiss ``IndexHNSWFlat``) finds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kvpolicy.types import SearchParams
from kvpolicy_contrib.indexes._base import FaissIndex, check_int

__all__ = ["FaissHNSWIndex"]


@dataclass(kw_only=True)
class FaissHNSWIndex(FaissIndex):
    """Pages are consecutive runs of ``S`` tokens; one ``faiss.IndexHNSWFlat`` (inner product, float32 keys)
    per (b, KV head) is a token-level HNSW graph (Malkov & Yashunin, TPAMI 2018). A search asks it for each
    query head's top ``m = ceil(k * S * oversample)`` tokens (scores exact, the set approximate) and ranks
    pages by their best token found.

    Defaults are faiss's (``index_factory("HNSW32")``; ``faiss/IndexHNSW.h``, ``faiss/impl/HNSW.h``): ``M`` 32
    neighbours per node (64 on level 0), ``ef_construction`` 40. ``efSearch`` is
    ``max(ef_search, m)`` (``SearchParams.ef_search`` overrides ``ef_search``; faiss default 16), since
    HNSW cannot return more than ``efSearch`` results. ``oversample`` 2: the graph misses some of the true top
    tokens; twice as many candidates raised recall@12 from 0.975 to 1.0 at T = 4096, D = 64, and changed nothing
    (0.996) at T = 8192, D = 128 for 1.6x the search time (docs/indexes.md): set 1.0 for speed.

    Deviation: HNSW is a nearest-neighbour graph and inner product is not a metric; faiss builds the graph on
    the inner product directly (no MIPS-to-L2 lifting), as ``IndexHNSWFlat(d, M, METRIC_INNER_PRODUCT)`` does.
    **Add**: HNSW inserts natively (``O(n ef_construction M log T)``); positional pages.
    Memory: 4 D bytes per token + about ``(2M + M/(M-1)) * 4`` bytes of links per token.
    """

    name: ClassVar[str] = "faiss_hnsw"
    # conformance sweep: recall@8 measured 1.0 on the suite's data and on 10 key seeds
    conformance: ClassVar[dict] = {"min_recall": 0.9}

    oversample: float = 2.0
    M: int = 32
    ef_construction: int = 40
    ef_search: int = 16

    def _check_fields(self) -> None:
        super()._check_fields()
        check_int("M", self.M, 2)
        check_int("ef_construction", self.ef_construction, 1)
        check_int("ef_search", self.ef_search, 1)

    def _new_row(self, x: np.ndarray) -> tuple[Any, None]:
        faiss = self._lib
        row = faiss.IndexHNSWFlat(x.shape[1], self.M, faiss.METRIC_INNER_PRODUCT)
        row.hnsw.efConstruction = self.ef_construction
        row.add(x)
        return row, None

    def _extend_row(self, row: Any, x: np.ndarray, first_id: int) -> None:
        row.add(x)

    def _search_row(self, row: Any, q: np.ndarray, m: int, params: SearchParams | None) -> np.ndarray:
        ef = params.ef_search if params is not None and params.ef_search is not None else self.ef_search
        check_int("ef_search", ef, 1)
        return row.search(q, m, params=self._lib.SearchParametersHNSW(efSearch=max(ef, m)))[1]
