"""Small tensor helpers shared by indexes and selectors (page top-k, GQA merge, input checks)."""

from __future__ import annotations

import functools
import importlib.util

import torch

from kvpolicy.types import PAD

__all__ = [
    "check_tensor", "gqa_merge", "gqa_merge_reference", "page_max_scores", "storage_key", "topk_ids", "topk_pages",
    "triton_available",
]

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


def topk_pages(scores: torch.Tensor, k: int, num_kv_heads: int) -> torch.Tensor:
    """Pages to load per KV head from per-query-head page scores (e.g. from ``kvpolicy_kernels.page_scores``):
    ``[B, Hq, C]`` -> ``[B, Hkv, min(k, G*k, C)]`` int64, best first, ``-1``-padded; ``-inf`` pages are never
    chosen. Each query head ranks its pages (``torch.topk`` on the scores' device), then the GQA group's
    rankings are interleaved (:func:`gqa_merge`), as the reference selectors do."""
    B, Hq, _ = scores.shape
    ids, _ = topk_ids(scores, k)  # [B, Hq, k']
    return gqa_merge(ids.view(B, num_kv_heads, Hq // num_kv_heads, -1), k)


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
