"""``full``: every page, every step (dense attention through the paged path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.types import PAD, SelectContext, Selection

__all__ = ["FullSelector", "all_pages"]


def all_pages(num_pages: torch.Tensor) -> torch.Tensor:
    """Page ids 0..P-1 of every row, PAD beyond the row's own count. num_pages: [B, Hkv] -> [B, Hkv, Pmax]."""
    P = int(num_pages.max()) if num_pages.numel() else 0
    ids = torch.arange(P, dtype=torch.int64).expand(*num_pages.shape, P)
    return torch.where(ids < num_pages.unsqueeze(-1), ids, PAD)


@dataclass(kw_only=True)
class FullSelector(Selector):
    """Selects every page: with it a policy is exact dense attention (the budget is ignored)."""

    name: ClassVar[str] = "full"
    query_aware: ClassVar[bool] = False
    uses_budget: ClassVar[bool] = False

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        return Selection(page_ids=all_pages(ctx.num_pages))
