"""``index_topk``: the top pages that the policy's index returns for the query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.types import SelectContext, Selection

__all__ = ["IndexTopKSelector"]


@dataclass(kw_only=True)
class IndexTopKSelector(Selector):
    """Asks ``ctx.index.search(query, ctx.k)``: swapping the index is then the only change in an ablation."""

    name: ClassVar[str] = "index_topk"
    requires_index: ClassVar[bool] = True

    def capture_key(self, ctx: SelectContext) -> tuple | None:
        """Capturable exactly when the index's search is (``Index.capture_key``)."""
        if ctx.index is None:
            return None
        key = ctx.index.capture_key(ctx.k, ctx.search_params)
        return None if key is None else ("index_topk", key)

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        if ctx.index is None:
            raise ValueError("selector 'index_topk' needs an index; set policy.index")
        return ctx.index.search(query, ctx.k, params=ctx.search_params)
