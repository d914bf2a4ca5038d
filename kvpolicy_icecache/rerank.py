"""Re-ranking IceCache's candidate pages by their tokens' exact scores (``IceCacheSelector(rerank=...)``).

The DCI search ranks each query head's pages by their best token (the page maximum of ``q . k`` over the cells
it scanned) and a GQA group's heads are merged by interleaving their ranks. Re-ranking asks the index for more
candidate pages than the budget holds, reads the candidates' keys from the layer's CPU page pool, scores every
token of every candidate exactly against the group's queries, and keeps the budget's pages by a page score
computed from those token scores:

* ``"max"``: the page's best ``q . k`` over its tokens and over the group's query heads (Quest's criterion,
  exact, and merged over the group by its maximum instead of interleaved ranks);
* ``"mass"``: the page's share of the attention over the candidates, ``sum_g sum_{t in page} softmax_g(scaling *
  q_g . k_t)``, with the softmax of query head ``g`` taken over every token of its KV head's candidates and the
  group's heads summed. This is the attention oracle's criterion (``kvpolicy.reference.oracle_selector``)
  restricted to the candidates: with every page a candidate, it selects what ``oracle`` selects on the same pages.

Only the pages change; every token of a chosen page is attended, as before. Logit soft-capping (Gemma) is not
applied to the scores (it does not change ``"max"``'s order).
"""

from __future__ import annotations

import math

import torch

from kvpolicy.ops import topk_ids
from kvpolicy.pool import PagePool
from kvpolicy.types import PAD

__all__ = ["RERANKS", "rerank_candidates", "rerank_pages"]

RERANKS = ("none", "max", "mass")  # IceCacheSelector.rerank: the page score that re-chooses the budget's pages


def rerank_candidates(k: int, factor: float) -> int:
    """Candidate pages asked of the index for ``k`` kept pages: ``ceil(factor * k)`` (at least ``k``)."""
    return max(k, math.ceil(factor * k - 1e-9))


def rerank_pages(query: torch.Tensor, ids: torch.Tensor, pool: PagePool, k: int, rule: str, scaling: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of each KV head's candidate pages by their tokens' exact scores.

    query: [B, Hq, D]; ids: [B, Hkv, C] candidate page ids (PAD-padded, any order) of ``pool`` (the layer's CPU
    page pool, whose page ids are the index's). Returns (ids [B, Hkv, min(k, C)] best first, PAD-padded; their
    scores, ``-inf`` on PAD: for ``"max"`` the best ``q . k``, for ``"mass"`` the attention share summed over the
    group's query heads; the same scores in ``q . k`` units, ``-inf`` on PAD: for ``"mass"`` ``log(share) /
    scaling``, so that a softmax of ``scaling *`` these over a head's pages gives back the shares, as
    ``kvpolicy.ops.share_pages`` takes them).
    """
    if rule not in RERANKS[1:]:
        raise ValueError(f"rerank_pages: rule must be one of {', '.join(map(repr, RERANKS[1:]))}, got {rule!r}")
    B, Hq, D = query.shape
    H, C = ids.shape[1], ids.shape[2]
    if Hq % H:
        raise ValueError(f"rerank_pages: {Hq} query heads do not divide into {H} KV heads")
    G, S = Hq // H, pool.page_size
    dev = query.device
    ids = ids.to(dev)
    valid = ids >= 0  # [B, H, C]
    # every (b, h, candidate) reads a page (padding reads page 0, masked below): a fixed shape, no nonzero()
    rows = (torch.arange(B, device=dev).view(B, 1, 1) * H + torch.arange(H, device=dev).view(1, H, 1)).expand(B, H, C)
    pages = ids.clamp(min=0)
    keys, _ = pool.read_pages(rows.reshape(-1), pages.reshape(-1), dtype=torch.float32, values=False)
    keys = keys.to(dev).view(B, H, C, S, D)
    lengths = pool.lengths.to(dev).gather(-1, pages)  # [B, H, C] valid tokens of each page
    tok_valid = (torch.arange(S, device=dev) < lengths.unsqueeze(-1)) & valid.unsqueeze(-1)  # [B, H, C, S]
    logits = torch.einsum("bhgd,bhcsd->bhgcs", query.float().view(B, H, G, D), keys)  # q . k
    logits = logits.masked_fill(~tok_valid.unsqueeze(2), float("-inf"))  # [B, H, G, C, S]
    if rule == "max":
        score = logits.amax(dim=(2, 4))  # [B, H, C], -inf on padding
        units = score
    else:
        share = torch.softmax(logits.reshape(B, H, G, C * S) * scaling, dim=-1).nan_to_num(0.0)
        score = share.view(B, H, G, C, S).sum(dim=(2, 4)).masked_fill(~valid, float("-inf"))
        units = torch.log(score.clamp(min=0.0)) / scaling  # log 0 = -inf: a page with no share
    pos, vals = topk_ids(score, k)  # positions among the candidates, best first; PAD where -inf
    keep = pos >= 0
    out = torch.where(keep, ids.gather(-1, pos.clamp(min=0)), PAD)
    units = torch.where(keep, units.gather(-1, pos.clamp(min=0)), float("-inf"))
    return out, vals.masked_fill(~keep, float("-inf")), units
