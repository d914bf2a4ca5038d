"""``faiss_flat``: positional pages scored by exact inner product through faiss ``IndexFlatIP``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kvpolicy.types import SearchParams
from kvpolicy_contrib.indexes._base import FaissIndex

__all__ = ["FaissFlatIndex"]


@dataclass(kw_only=True)
class FaissFlatIndex(FaissIndex):
    """Pages are consecutive runs of ``S`` tokens (as in ``exact``); one ``faiss.IndexFlatIP`` per
    (b, KV head) holds a float32 copy of the keys and returns each query head's top ``k * S`` tokens by exact
    ``q . k`` (brute force, faiss wiki "Faiss indexes": ``IndexFlatIP``). Pages are ranked by their best
    token; with exact scores ``oversample = 1`` is enough for the exact top-``k`` pages (module
    ``_base``), so the selection equals ``exact``'s up to float ties. ``add`` appends to the flat index
    (``O(n D)``). Memory: 4 D bytes per token.
    """

    name: ClassVar[str] = "faiss_flat"
    # conformance sweep (tests/test_conformance.py, tiny() = defaults): recall@8 measured 1.0 on the suite's data
    # and on 10 key seeds
    conformance: ClassVar[dict] = {"min_recall": 1.0}

    def _new_row(self, x: np.ndarray) -> tuple[Any, None]:
        row = self._lib.IndexFlatIP(x.shape[1])
        row.add(x)
        return row, None

    def _extend_row(self, row: Any, x: np.ndarray, first_id: int) -> None:
        row.add(x)

    def _search_row(self, row: Any, q: np.ndarray, m: int, params: SearchParams | None) -> np.ndarray:
        return row.search(q, m)[1]
