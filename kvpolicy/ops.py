"""Small tensor helpers shared by indexes and selectors (page top-k, GQA merge, input checks)."""

from __future__ import annotations

import functools
import importlib.util

import torch

from kvpolicy.types import PAD

__all__ = [
    "GQA_MERGES", "check_gqa_merge", "check_tensor", "gqa_merge", "gqa_merge_reference", "group_page_scores",
    "page_max_scores", "rank_group_pages", "share_pages", "storage_key", "topk_ids", "topk_pages", "triton_available",
]

# How the query heads of a GQA group share their KV head's pages (``SearchParams.gqa_merge``):
# "interleave" ranks per query head and interleaves the ranks (gqa_merge, IceCache's rule); "max" and "mean" merge
# the group's page scores first (group_page_scores) and rank once.
GQA_MERGES = ("interleave", "max", "mean")

_BIG_ID = 1 << 40  # above any page id; (id * L + pos) stays far below 2**63


def check_tensor(name: str, t: object, ndim: int, *, floating: bool = True, dims: str = "") -> torch.Tensor:
    """Raise a clear TypeError/ValueError unless ``t`` is a tensor of ``ndim`` dims (and floating)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {dims}, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    return t


def topk_ids(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` indices along the last dim, best first; entries scored ``-inf`` come back as PAD.

    scores: [..., P] float; returns (ids [..., k'] int64, values [..., k']) with k' = min(k, P).
    """
    k = min(k, scores.shape[-1])
    vals, ids = scores.topk(k, dim=-1, sorted=True)
    ids = torch.where(torch.isneginf(vals), torch.full_like(ids, PAD), ids)
    return ids, vals


def gqa_merge(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Merge the page rankings of a GQA group's query heads into one list per KV head.

    Ranks are interleaved (rank 0 of every head of the group, then rank 1, ...) and the first ``k`` distinct
    pages are kept, as in IceCache's reference decode loop (source: yuzhenmao/IceCache, ``gqa`` merge in
    ``infer_state.py``). ranked: [B, Hkv, G, R] int64 PAD-padded, best first -> [B, Hkv, min(k, G*R)].
    On CUDA with triton installed (and ``G * R <= kvpolicy_kernels.gqa_merge.MAX_ENTRIES``) one kernel does it
    (``kvpolicy_kernels.gqa_merge``); ``gqa_merge_reference`` is the definition.
    """
    if ranked.is_cuda and triton_available():
        from kvpolicy_kernels.gqa_merge import MAX_ENTRIES, gqa_merge_triton

        if ranked.shape[-2] * ranked.shape[-1] <= MAX_ENTRIES:
            return gqa_merge_triton(ranked, k)
    return gqa_merge_reference(ranked, k)


def check_gqa_merge(rule: object, supported: tuple[str, ...] = GQA_MERGES, who: str = "gqa_merge") -> str:
    """Return ``rule`` if it is one of ``supported``, else raise ValueError listing them."""
    if rule not in supported:
        raise ValueError(f"{who} must be one of {', '.join(map(repr, supported))}, got {rule!r}")
    return rule  # type: ignore[return-value]


def group_page_scores(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Page scores of a GQA group before ranking. scores: [..., G, P] per query head (``-inf``: not scored) ->
    ``"interleave"``: unchanged (each head ranks its own pages, then ``gqa_merge``); ``"max"``: [..., 1, P], the
    best score over the group's heads; ``"mean"``: [..., 1, P], the mean over the heads that scored the page
    (``-inf`` where none did)."""
    check_gqa_merge(rule)
    if rule == "interleave":
        return scores
    if rule == "max":
        return scores.amax(dim=-2, keepdim=True)
    finite = torch.isfinite(scores)
    n = finite.sum(dim=-2, keepdim=True)
    total = torch.where(finite, scores, torch.zeros_like(scores)).sum(dim=-2, keepdim=True)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("-inf")))


def rank_group_pages(scores: torch.Tensor, k: int, rule: str = "interleave"
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top ``k`` pages of each KV head from its query heads' page scores, merged by ``rule``: scores
    [B, Hkv, G, P] -> (ids [B, Hkv, k'] best first, PAD-padded; the merged scores [B, Hkv, k'], ``-inf`` on PAD, or
    None for ``"interleave"``, whose ranking has no single score)."""
    B, H = scores.shape[:2]
    ids, vals = topk_ids(group_page_scores(scores, rule), k)  # [B, H, G', k']
    if rule == "interleave":
        return gqa_merge(ids, k), None
    return ids[:, :, 0], vals[:, :, 0]


def share_pages(ids: torch.Tensor, scores: torch.Tensor, k: int, scaling: float = 1.0) -> torch.Tensor:
    """Per-head budgets: ``Hkv * k`` pages per batch row, shared among its KV heads by attention mass.

    ids/scores: [B, Hkv, C] each head's candidate pages best first (PAD / ``-inf`` padded, C >= k) with scores in
    q.k units. Each head turns its candidates' scores into a softmax (``scaling * score``); the row keeps the
    ``Hkv * k`` (head, page) pairs of largest share, each head at least its best page. A head whose attention is
    flat over its candidates gets more pages than one whose attention sits on a few. Every head keeps a prefix of
    its ranking (its count of kept pairs), at most C pages. -> ids [B, Hkv, C], PAD past each head's count. No host
    synchronisation."""
    B, H, C = ids.shape
    valid = ids >= 0
    share = torch.softmax((scores.float() * scaling).masked_fill(~valid, float("-inf")), dim=-1)
    share = torch.nan_to_num(share, nan=0.0).masked_fill(~valid, -1.0)  # (rows without a candidate: all -1)
    share[..., :1] = torch.where(valid[..., :1], 2.0, -1.0)  # every head keeps its best page
    take = min(H * k, H * C)
    top = share.reshape(B, H * C).topk(take, dim=-1).indices
    chosen = torch.zeros(B, H * C, dtype=torch.bool, device=ids.device).scatter_(-1, top, True).view(B, H, C)
    keep = torch.arange(C, device=ids.device) < chosen.sum(-1, keepdim=True)
    return torch.where(keep & valid, ids, PAD)


def topk_pages(scores: torch.Tensor, k: int, num_kv_heads: int) -> torch.Tensor:
    """Pages to load per KV head from per-query-head page scores (e.g. from ``kvpolicy_kernels.page_scores``):
    ``[B, Hq, C]`` -> ``[B, Hkv, min(k, G*k, C)]`` int64, best first, ``-1``-padded; ``-inf`` pages are never
    chosen. Each query head ranks its pages (``torch.topk`` on the scores' device), then the GQA group's
    rankings are interleaved (:func:`gqa_merge`), as the reference selectors do."""
    B, Hq, _ = scores.shape
    ids, _ = topk_ids(scores, k)  # [B, Hq, k']
    return gqa_merge(ids.view(B, num_kv_heads, Hq // num_kv_heads, -1), k)


def unique_storages(tensors) -> list[torch.Tensor]:
    """The tensors, one per storage (the first seen of each): views and aliases are counted once."""
    seen: dict[tuple, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault((t.device, t.untyped_storage().data_ptr()), t)
    return list(seen.values())


def storage_key(*tensors: torch.Tensor) -> tuple:
    """(address, shape) of each tensor: equal keys mean the same storage, so a CUDA graph recorded over these
    tensors is still valid (the ``capture_key`` hooks of the parts are built from it)."""
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (the kernels in ``kernels/`` need it; every caller has a torch fallback)."""
    return importlib.util.find_spec("triton") is not None


def gqa_merge_reference(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """The torch definition of ``gqa_merge`` (two sorts, no host synchronisation)."""
    B, H, G, R = ranked.shape
    L = G * R
    k = min(k, L)
    flat = ranked.transpose(-1, -2).reshape(B, H, L)  # [B, H, L] rank-major
    if L == 0:
        return flat
    pos = torch.arange(L, device=flat.device).expand(B, H, L)
    valid = flat >= 0
    key = torch.where(valid, flat, _BIG_ID) * L + pos  # sort by (id, position); no host sync

    skey, order = key.sort(dim=-1)
    sid = torch.where(valid.gather(-1, order), flat.gather(-1, order), PAD)
    first = torch.ones_like(sid, dtype=torch.bool)
    first[..., 1:] = sid[..., 1:] != sid[..., :-1]
    first &= sid >= 0
    keep = torch.zeros_like(first).scatter(-1, order, first)  # [B, H, L] first occurrence, valid
    # stable compaction: kept entries first, in position order
    ckey = torch.where(keep, pos, pos + L)
    corder = ckey.argsort(dim=-1)[..., :k]
    out = flat.gather(-1, corder)
    return torch.where(keep.gather(-1, corder), out, PAD)


def page_max_scores(scores: torch.Tensor, token_page: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Max over each page's tokens. scores: [B, Hq, T]; token_page: [B, Hq, T] int64 (PAD = skip)
    -> [B, Hq, num_pages] with -inf for empty pages."""
    B, Hq, _ = scores.shape
    out = torch.full((B, Hq, num_pages), float("-inf"), dtype=scores.dtype, device=scores.device)
    valid = token_page >= 0
    src = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    return out.scatter_reduce(-1, token_page.clamp(min=0), src, reduce="amax", include_self=True)
