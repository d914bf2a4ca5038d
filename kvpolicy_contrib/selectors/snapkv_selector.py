"""``snapkv``: SnapKV (Li et al., NeurIPS 2024): prefill-time selection by observation-window votes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvpolicy.interfaces import Selector
from kvpolicy.types import PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import TokenPages, rank_pages, token_softmax_mass

__all__ = ["SnapKVSelector"]


@dataclass(kw_only=True)
class SnapKVSelector(Selector):
    """The queries of the prompt's last ``window`` tokens (the observation window) vote for the earlier tokens
    with their causal softmax attention; votes are summed over the window and the GQA group, smoothed along the
    sequence by pooling (``pooling``, ``kernel``), summed per page, and the top pages are kept for the whole
    decode (fixed after prefill; the rest is never loaded). The query is not used at decode time.

    Defaults: observation window 32, pooling kernel 7 with max pooling (the setting of KVCache-Factory's SnapKV
    used in LongBench comparisons); preset ``snapkv`` uses single-token pages (SnapKV keeps tokens).
    ``obs_offset`` ends the observation window that many tokens before the end of the prompt: with the question's
    length, the votes come from the context alone ("question hidden" mode, as when a cache is compressed before
    the question is known). Deviations: SnapKV keeps every generated token, growing past its budget; here the
    budget is fixed, so generated tokens live in the recent window and are dropped when they leave it.
    """

    name: ClassVar[str] = "snapkv"
    query_aware: ClassVar[bool] = False  # aware of the prompt's last queries, not of the decode query
    needs_prompt_queries: ClassVar[bool] = True
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    obs_offset: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 1, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.obs_offset < 0:
            raise ValueError(f"obs_offset must be >= 0, got {self.obs_offset}")
        self.reset()

    def reset(self) -> None:
        self.scores: torch.Tensor | None = None  # [B, Hkv, P] votes of the prompt's pages

    def votes(self, keys: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        """Pooled votes of the index's tokens. keys: [B, Hkv, n, D] -> [B, Hkv, n]."""
        q_all, k_all = ctx.prompt_queries, ctx.prompt_keys  # [B, Hq, T, D], [B, Hkv, T, D]
        if q_all is None or k_all is None:
            raise ValueError("snapkv needs the prompt's queries and keys in prepare(); run the prefill through the cache")
        T, n = k_all.shape[2], keys.shape[2]
        end = max(1, T - self.obs_offset)
        start = max(0, end - self.window)
        pos = torch.arange(start, end, device=k_all.device)
        span = (ctx.index_offset, ctx.index_offset + n)
        v = token_softmax_mass(q_all[:, :, start:end], k_all, pos, ctx.scaling, span)  # [B, Hkv, n]
        B, H, _ = v.shape
        flat = v.reshape(B * H, 1, n)
        pad = self.kernel // 2
        if self.pooling == "max":
            flat = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            flat = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return flat.view(B, H, n)

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        pages = TokenPages()
        pages.write(layout, keys.device)
        P = int(layout.num_pages.max()) if layout.num_pages.numel() else 0
        v = self.votes(keys, ctx).to(keys.device) if keys.shape[2] else keys.new_zeros(keys.shape[:3]).float()
        self.scores = pages.reduce(v, P, "sum")  # [B, Hkv, P]

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        # pages written after prefill have no votes: never selected
        return rank_pages(self.scores, ctx.k)
