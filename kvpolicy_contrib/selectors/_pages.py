"""Mechanics shared by the baseline selectors: page keys from the pool, token -> page maps, page ranking.

Selectors keep their own metadata (bounds, codes, hashes, scores), built once when a page is written
(``prepare``/``update``), never by re-reading the whole offloaded cache at each step.
"""

from __future__ import annotations

import torch

from kvpolicy.ops import gqa_merge, page_max_scores, topk_ids
from kvpolicy.pool import PagePool
from kvpolicy.types import PAD, PageLayout, SelectContext, Selection

__all__ = ["TokenPages", "page_keys", "page_valid", "rank_pages", "rank_pages_per_head", "token_softmax_mass"]


def page_keys(pool: PagePool, page_ids: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of some pages, read once from the pool when they are written.

    page_ids: [B, Hkv, M] int64 (PAD allowed) -> (keys [B, Hkv, M, S, D] float32 on ``device``,
    valid [B, Hkv, M, S] bool: real tokens of real pages)."""
    B, H, M = page_ids.shape
    S, D = pool.page_size, pool.head_dim
    ids = page_ids.to(pool.device).clamp(min=0)
    rows = torch.arange(B * H, device=pool.device).repeat_interleave(M)  # [B*H*M] the (b, head) row of each page
    k = pool.read_pages(rows, ids.reshape(-1), dtype=torch.float32, values=False)[0].view(B, H, M, S, D)
    lens = torch.where(page_ids.to(pool.device) >= 0, pool.lengths.gather(2, ids), 0)  # [B, H, M]
    valid = torch.arange(S, device=pool.device) < lens.unsqueeze(-1)  # [B, H, M, S]
    return k.to(device=device), valid.to(device)


def page_valid(ctx: SelectContext, P: int, device: torch.device) -> torch.Tensor:
    """[B, Hkv, P] bool: page p exists in row (b, h) (ids below that row's page count). The counts may live
    on the CPU (a CPU index): they are copied without blocking the host."""
    return torch.arange(P, device=device) < ctx.num_pages.to(device, non_blocking=True).unsqueeze(-1)


def rank_pages(scores: torch.Tensor, k: int) -> Selection:
    """Top-``k`` pages per KV head from one score per page. scores: [B, Hkv, P] float, -inf = never."""
    ids, vals = topk_ids(scores, k)
    return Selection(page_ids=ids, scores=vals.float())


def rank_pages_per_head(scores: torch.Tensor, num_kv_heads: int, k: int) -> Selection:
    """Top-``k`` pages per KV head from per-query-head scores [B, Hq, P]: each query head ranks its pages and
    the GQA group's rankings are interleaved (``kvpolicy.ops.gqa_merge``, as the ``exact`` index does)."""
    B, Hq, P = scores.shape
    ids, _ = topk_ids(scores, k)  # [B, Hq, k]
    return Selection(page_ids=gqa_merge(ids.view(B, num_kv_heads, Hq // num_kv_heads, -1), k))


def token_softmax_mass(
    queries: torch.Tensor,  # [B, Hq, Q, D] queries at prompt positions q_pos
    keys: torch.Tensor,  # [B, Hkv, T, D] every prompt key
    q_pos: torch.Tensor,  # [Q] int64 prompt positions of the queries
    scaling: float,
    span: tuple[int, int],  # [start, end) prompt positions whose mass is returned
    chunk: int = 256,
) -> torch.Tensor:  # [B, Hkv, end - start] float32: causal softmax mass summed over queries and the GQA group
    """Attention mass that prompt queries put on a span of prompt keys (causal softmax over every key)."""
    B, Hq, Q, D = queries.shape
    H, T = keys.shape[1], keys.shape[2]
    G = Hq // H
    k = keys.float()
    pos = torch.arange(T, device=keys.device)
    out = torch.zeros(B, H, span[1] - span[0], dtype=torch.float32, device=keys.device)
    for c in range(0, Q, chunk):
        q = queries[:, :, c : c + chunk].to(keys.device).float().view(B, H, G, -1, D)  # [B, H, G, c, D]
        logits = torch.einsum("bhgcd,bhtd->bhgct", q, k) * scaling  # [B, H, G, c, T]
        future = pos.view(1, -1) > q_pos[c : c + chunk].to(keys.device).view(-1, 1)  # [c, T]
        p = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        out += p[..., span[0] : span[1]].sum(dim=(2, 3))
    return out


class TokenPages:
    """Index-local token id -> page id, per (b, KV head), maintained from the layouts of build and add.

    Lets a token-level scorer (PQ codes, hashes, attention votes) rank pages of any index: the page score is a
    reduction (max or sum) of its tokens' scores."""

    def __init__(self) -> None:
        self.page: torch.Tensor | None = None  # [B, Hkv, Tcap + 1] int64, PAD = no page; last column: sink for PAD
        self.n = 0

    def write(self, layout: PageLayout, device: torch.device) -> None:
        """Record the pages of ``layout`` (every page after a build, the changed ones after an add)."""
        B, H, M, S = layout.token_ids.shape
        n = layout.num_tokens
        if self.page is None or self.page.shape[:2] != (B, H):
            self.page = torch.full((B, H, max(n, 1) + 1), PAD, dtype=torch.int64, device=device)
        elif n + 1 > self.page.shape[-1]:
            grown = torch.full((B, H, max(n, 2 * self.page.shape[-1]) + 1), PAD, dtype=torch.int64, device=device)
            grown[:, :, : self.n] = self.page[:, :, : self.n]
            self.page = grown
        cap = self.page.shape[-1] - 1
        tids = layout.token_ids.to(device)
        pids = layout.page_ids.to(device).unsqueeze(-1).expand(B, H, M, S)
        dst = torch.where(tids >= 0, tids, cap).reshape(B, H, M * S)
        self.page.scatter_(2, dst, torch.where(tids >= 0, pids, PAD).reshape(B, H, M * S))
        self.page[:, :, cap] = PAD
        self.n = n

    def reduce(self, token_scores: torch.Tensor, num_pages: int, how: str) -> torch.Tensor:
        """Page scores from token scores. token_scores: [B, Hx, n] (Hx a multiple of Hkv) -> [B, Hx, P]
        (``how`` = "max": -inf for empty pages; "sum": 0 for empty pages)."""
        B, Hx, n = token_scores.shape
        H = self.page.shape[1]
        page = self.page[:, :, :n].repeat_interleave(Hx // H, dim=1)  # [B, Hx, n]
        if how == "max":
            return page_max_scores(token_scores, page, num_pages)
        if how == "sum":
            out = torch.zeros((B, Hx, num_pages), dtype=token_scores.dtype, device=token_scores.device)
            return out.scatter_add(-1, page.clamp(min=0), token_scores.masked_fill(page < 0, 0))
        raise ValueError(f"unknown page reduction {how!r}; use 'max' or 'sum'")
