"""``streaming``: StreamingLLM (Xiao et al., 2024): attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.ops import topk_ids
from kvpolicy.types import SelectContext, Selection

__all__ = ["StreamingSelector"]


@dataclass(kw_only=True)
class StreamingSelector(Selector):
    """Fills the retrieved part of the budget with the pages holding the newest tokens, so the policy
    attends to its sink pages and one contiguous recent span of ``budget - sink`` tokens (with a positional
    index). Query-agnostic; reads only token ids from the pool."""

    name: ClassVar[str] = "streaming"
    query_aware: ClassVar[bool] = False

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        P = int(ctx.num_pages.max()) if ctx.num_pages.numel() else 0
        newest = ctx.pool.token_ids[:, :, :P].amax(dim=-1).float()  # [B, Hkv, P], -1 for empty pages
        newest = newest.masked_fill(newest < 0, float("-inf"))
        ids, _ = topk_ids(newest, ctx.k)
        return Selection(page_ids=ids)
