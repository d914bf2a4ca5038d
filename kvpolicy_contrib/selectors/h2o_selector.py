"""``h2o``: H2O (Zhang et al., NeurIPS 2023): heavy hitters by accumulated attention, plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.types import PAD, PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import TokenPages, page_keys, token_softmax_mass

__all__ = ["H2OSelector"]


@dataclass(kw_only=True)
class H2OSelector(Selector):
    """A fixed-size kept set of pages per KV head; everything else is evicted for good.

    * Prefill: every prompt query's causal softmax attention is accumulated on the offloaded tokens (summed over
      the GQA group); the kept set is the ``recent`` newest pages plus the pages with the most accumulated
      attention. ``recent`` pages are ``recent_ratio`` of the budget minus the always-kept window.
    * Decode: each step the query's attention over the kept pages is added to their scores (the attention the
      step computes anyway). A page leaving the recent window joins the kept set; when it is full, the kept page
      with the least accumulated attention outside the recent part is evicted, permanently.

    Defaults follow H2O: half the budget heavy hitters, half recent tokens; preset ``h2o`` uses single-token
    pages (H2O evicts tokens). Deviations: the decode-time softmax runs over the kept pages only (sink and window
    are outside the selector's view), and the kept pages' keys are read from the pool at each step (they are the
    pages the step attends to).
    """

    name: ClassVar[str] = "h2o"
    query_aware: ClassVar[bool] = False  # the kept set follows past attention, not the current query
    needs_prompt_queries: ClassVar[bool] = True
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"recent_ratio must be in [0, 1), got {self.recent_ratio}")
        self.reset()

    def reset(self) -> None:
        self.kept: torch.Tensor | None = None  # [B, Hkv, K] kept page ids (PAD = free entry)
        self.acc: torch.Tensor | None = None  # [B, Hkv, K] accumulated attention of each kept page
        self.newest: torch.Tensor | None = None  # [B, Hkv, K] newest token id of each kept page (its age)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, newest token) [B, Hkv] of new pages
        self.unlimited = False

    def _recent_pages(self, ctx: SelectContext, k: int) -> int:
        b = ctx.budget
        if b.retrieved_pages is None:
            return 0
        return min(k, max(0, round(self.recent_ratio * b.tokens) - b.window_tokens) // b.page_size)

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self.reset()
        B, H, n, _ = keys.shape
        dev = keys.device
        P = int(layout.num_pages.max()) if layout.num_pages.numel() else 0
        T = ctx.prompt_keys.shape[2]
        acc = token_softmax_mass(ctx.prompt_queries, ctx.prompt_keys, torch.arange(T, device=ctx.prompt_keys.device),
                                 ctx.scaling, (ctx.index_offset, ctx.index_offset + n)).to(dev)  # [B, H, n]
        pages = TokenPages()
        pages.write(layout, dev)
        score = pages.reduce(acc, P, "sum")  # [B, H, P]
        self.unlimited = ctx.budget.unlimited
        K = P if self.unlimited else ctx.budget.retrieved_pages  # kept entries (free ones stay PAD)
        recent = self._recent_pages(ctx, K)
        ids = torch.arange(P, device=dev).expand(B, H, P)
        exists = ids < ctx.num_pages.to(dev).unsqueeze(-1)
        newest = pages.reduce(torch.arange(n, device=dev, dtype=torch.float32).expand(B, H, n), P, "max")  # [B, H, P]
        is_recent = torch.zeros_like(exists)
        if recent:
            rk = newest.masked_fill(~exists, float("-inf")).topk(min(recent, P), dim=-1).indices
            is_recent.scatter_(-1, rk, True)
        # recent pages first (they cannot be evicted yet), then heavy hitters by accumulated attention
        rank = torch.where(is_recent, float("inf"), score).masked_fill(~exists, float("-inf"))
        top = rank.topk(min(K, P), dim=-1)
        free = K - top.indices.shape[-1]
        kept = torch.where(torch.isneginf(top.values), PAD, top.indices)
        self.kept = torch.cat([kept, kept.new_full((B, H, free), PAD)], -1)  # [B, H, K]
        self.acc = torch.cat([score.gather(-1, top.indices), score.new_zeros(B, H, free)], -1).masked_fill(
            self.kept < 0, 0.0)
        self.newest = torch.cat([newest.gather(-1, top.indices), newest.new_zeros(B, H, free)], -1).masked_fill(
            self.kept < 0, -1.0)

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        for m in range(layout.page_ids.shape[-1]):
            ids = layout.page_ids[..., m]  # [B, Hkv]
            newest = layout.token_ids[..., m, :].amax(-1)
            self.pending.append((ids, newest))

    def _admit(self, ids: torch.Tensor, newest: torch.Tensor, recent: int) -> None:
        """A page that left the window joins the kept set, evicting the weakest non-recent entry if full."""
        dev = self.kept.device
        ids, newest = ids.to(dev), newest.to(dev).float()
        already = (self.kept == ids.unsqueeze(-1)).any(-1)  # a page written again (partial page completed)
        free = self.kept < 0
        # recent entries: the `recent` newest kept pages are protected
        age_rank = self.newest.argsort(-1, descending=True).argsort(-1)  # 0 = newest
        protected = (age_rank < recent) & ~free
        victim_key = torch.where(free, float("-inf"), torch.where(protected, float("inf"), self.acc))
        slot = victim_key.argmin(-1, keepdim=True)  # [B, H, 1]
        ok = (~already & (ids >= 0) & ~torch.isposinf(victim_key.gather(-1, slot).squeeze(-1))).unsqueeze(-1)
        self.kept.scatter_(-1, slot, torch.where(ok, ids.unsqueeze(-1), self.kept.gather(-1, slot)))
        self.acc.scatter_(-1, slot, torch.where(ok, 0.0, self.acc.gather(-1, slot)))
        self.newest.scatter_(-1, slot, torch.where(ok, newest.unsqueeze(-1), self.newest.gather(-1, slot)))

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        if self.unlimited:  # nothing is ever evicted
            P = int(ctx.num_pages.max())
            ids = torch.arange(P, device=ctx.num_pages.device).expand(*ctx.num_pages.shape, P)
            return Selection(page_ids=torch.where(ids < ctx.num_pages.unsqueeze(-1), ids, PAD))
        if self.kept.shape[-1] == 0:
            return Selection(page_ids=self.kept)
        recent = self._recent_pages(ctx, self.kept.shape[-1])
        for ids, newest in self.pending:
            self._admit(ids, newest, recent)
        self.pending = []
        # this step's attention over the kept pages, accumulated
        B, Hq, D = query.shape
        H = ctx.num_kv_heads
        keys, valid = page_keys(ctx.pool, self.kept, self.kept.device)  # [B, H, K, S, D], [B, H, K, S]
        K, S = keys.shape[2], keys.shape[3]
        q = query.to(keys.device).float().view(B, H, Hq // H, D)
        logits = torch.einsum("bhgd,bhtd->bhgt", q, keys.view(B, H, K * S, D)) * ctx.scaling
        p = logits.masked_fill(~valid.view(B, H, 1, K * S), float("-inf")).softmax(-1).nan_to_num(0.0)
        self.acc += p.view(B, H, -1, K, S).sum(dim=(2, 4))
        order = self.acc.masked_fill(self.kept < 0, float("-inf")).argsort(-1, descending=True)
        ids = self.kept.gather(-1, order)
        return Selection(page_ids=ids[..., : ctx.k])
