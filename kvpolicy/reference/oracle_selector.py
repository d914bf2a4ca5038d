"""``oracle``: the pages with the most exact attention mass (an upper bound for page selectors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.ops import topk_ids
from kvpolicy.types import SelectContext, Selection

__all__ = ["OracleSelector", "page_attention_mass"]


def page_attention_mass(query: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
    """Softmax attention mass of each offloaded page, summed over the GQA group's query heads.

    Reads every page of the layer's CPU pool (the oracle may; real selectors may not).
    query: [B, Hq, D] -> [B, Hkv, P] float32, -inf for empty pages. The softmax runs over the offloaded
    tokens only (sink and window are always attended, so they do not change the ranking within a head).
    """
    pool = ctx.pool
    P = int(ctx.num_pages.max()) if ctx.num_pages.numel() else 0
    B, H, S, D = pool.batch_size, pool.num_kv_heads, pool.page_size, pool.head_dim
    G = query.shape[1] // H
    k = pool.read_range(0, P, dtype=torch.float32)[0].reshape(B, H, P * S, D)  # [B, H, P*S, D] (dequantised)
    valid = (torch.arange(S) < pool.lengths[:, :, :P].unsqueeze(-1).cpu()).reshape(B, H, 1, P * S)
    q = query.to(k.device).float().view(B, H, G, D)
    logits = torch.einsum("bhgd,bhtd->bhgt", q, k) * ctx.scaling  # [B, H, G, P*S]
    logits = logits.masked_fill(~valid.to(logits.device), float("-inf"))
    mass = logits.softmax(dim=-1).nan_to_num(0.0).view(B, H, G, P, S).sum(dim=(2, 4))  # [B, H, P]
    empty = pool.lengths[:, :, :P].to(mass.device) == 0
    return mass.masked_fill(empty, float("-inf"))


@dataclass(kw_only=True)
class OracleSelector(Selector):
    """Exact top-k pages by attention mass, recomputed from all keys at every step. A reference and an
    upper bound, not a practical policy: it reads the whole offloaded cache each step."""

    name: ClassVar[str] = "oracle"

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        ids, vals = topk_ids(page_attention_mass(query, ctx), ctx.k)
        return Selection(page_ids=ids, scores=vals)
