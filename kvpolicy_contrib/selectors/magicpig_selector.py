"""``magicpig``: MagicPIG (Chen et al., 2024): SimHash LSH sampling of the tokens to attend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.types import PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import TokenPages, page_valid, rank_pages

__all__ = ["MagicPIGSelector"]


@dataclass(kw_only=True)
class MagicPIGSelector(Selector):
    """``L`` hash tables, each keyed by ``K`` random-hyperplane sign bits (SimHash), index every key. A token
    is *sampled* for a query when its hash equals the query's in at least ``min_collisions`` tables; the pages
    holding sampled tokens are ranked by their best collision count (summed over the GQA group's query heads)
    and at most the budget's pages are loaded. Rows with fewer sampled pages load fewer pages (MagicPIG's
    sample size adapts to the query in the same way); an unlimited budget reads every page, sampled ones first.

    Defaults follow the MagicPIG paper's Llama-3.1-8B setting, ``(K, L) = (10, 150)``, a token counting as
    sampled at two collisions or more; preset ``magicpig`` uses single-token pages. ``center_keys`` subtracts
    the mean prefill key before hashing: that removes the direction every key shares (which otherwise makes all
    keys collide with every query) and does not change attention, since ``q . (k - m)`` moves every logit of a
    query by the same ``q . m``.

    **Estimator.** MagicPIG does not select: it attends to its sample with importance weights ``1 / p_i`` (``p_i``
    the collision probability of token ``i``), an estimate of the full attention output. kvpolicy's attention
    takes no per-token weights, so here the sample is a selection: its tokens are attended with plain softmax
    weights, capped at the budget by collision count. That is a top-k-like, biased estimate: it drops the
    correction that the weights give to the many low-similarity tokens the sample misses or over-represents.
    """

    name: ClassVar[str] = "magicpig"
    K: int = 10
    L: int = 150
    min_collisions: int = 2
    center_keys: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.K <= 30:
            raise ValueError(f"K (bits per table) must be in [1, 30], got {self.K}")
        if self.L < 1 or not 1 <= self.min_collisions <= self.L:
            raise ValueError(f"need L >= 1 and 1 <= min_collisions <= L, got L={self.L}, min_collisions={self.min_collisions}")
        self.reset()

    def reset(self) -> None:
        self.planes: torch.Tensor | None = None  # [D, L*K] random hyperplanes
        self.mean: torch.Tensor | None = None  # [B, Hkv, 1, D] centring of keys
        self.codes: torch.Tensor | None = None  # [B, Hkv, Tcap, L] int32 hash of each token in each table
        self.pages = TokenPages()
        self.n = 0

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., L] int32 bucket of each table."""
        bits = (x.float() @ self.planes > 0).view(*x.shape[:-1], self.L, self.K).int()  # [..., L, K]
        weights = (1 << torch.arange(self.K, device=x.device, dtype=torch.int32))
        return (bits * weights).sum(-1, dtype=torch.int32)

    def _append(self, keys: torch.Tensor) -> None:
        B, H, n, _ = keys.shape
        codes = self._hash(keys.float() - self.mean)  # [B, H, n, L]
        if self.codes is None or self.n + n > self.codes.shape[2]:
            grown = codes.new_zeros(B, H, 2 * (self.n + n), self.L)
            if self.codes is not None:
                grown[:, :, : self.n] = self.codes[:, :, : self.n]
            self.codes = grown
        self.codes[:, :, self.n : self.n + n] = codes
        self.n += n

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:  # keys: [B, Hkv, n, D]
        self.reset()
        B, H, n, D = keys.shape
        g = torch.Generator().manual_seed(self.seed * 100_003 + ctx.layer)
        self.planes = torch.randn(D, self.L * self.K, generator=g).to(keys.device)
        self.mean = keys.float().mean(2, keepdim=True) if self.center_keys and n else keys.new_zeros(B, H, 1, D).float()
        self._append(keys)
        self.pages.write(layout, keys.device)

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self._append(keys)
        self.pages.write(layout, keys.device)

    @property
    def nbytes(self) -> int:
        """Hash tables at ``K`` bits per table and token, plus the hyperplanes."""
        if self.codes is None:
            return 0
        B, H = self.codes.shape[:2]
        return self.planes.nbytes + (B * H * self.n * self.L * self.K + 7) // 8

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        B, Hq, D = query.shape
        H = ctx.num_kv_heads
        G = Hq // H
        P = int(ctx.num_pages.max()) if ctx.num_pages.numel() else 0
        dev = self.codes.device
        qh = self._hash(query.to(dev).float()).view(B, H, G, 1, self.L)  # [B, H, G, 1, L]
        hits = torch.zeros(B, H, G, self.n, dtype=torch.int32, device=dev)
        step = max(1, (1 << 22) // max(1, B * H * G * self.L))  # tokens per chunk: bounded temporary memory
        for s in range(0, self.n, step):
            c = self.codes[:, :, s : min(s + step, self.n)].unsqueeze(2)  # [B, H, 1, c, L]
            hits[..., s : s + step] = (c == qh).sum(-1, dtype=torch.int32)
        sampled = hits >= self.min_collisions  # [B, H, G, n]
        token = torch.where(sampled, hits.float(), 0.0).sum(2)  # [B, H, n] collisions over the group's heads
        # unsampled tokens: never loaded, except under an unlimited budget (which reads every page, as everywhere)
        token = token.masked_fill(~sampled.any(2), -1.0 if ctx.budget.unlimited else float("-inf"))
        scores = self.pages.reduce(token, P, "max")  # [B, H, P]
        return rank_pages(scores.masked_fill(~page_valid(ctx, P, dev), float("-inf")), ctx.k)
