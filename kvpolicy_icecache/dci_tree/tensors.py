"""Row-wise tensor helpers of the DCI tree (segments, compaction, distinct values) and its constants."""

from __future__ import annotations

import torch

from kvpolicy.ops import triton_available
from kvpolicy.types import PAD

_NEG_INF = float("-inf")
_CHUNK_ELEMS = 1 << 22  # score-matrix entries per chunk of the brute-force parent assignment


def _triton_interpreting() -> bool:
    if not triton_available():
        return False
    from kvpolicy_kernels._checks import interpreting

    return interpreting()


def _segment_pos(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Position of each entry inside its run of equal keys (keys sorted along the last dim)."""
    n = sorted_keys.shape[-1]
    idx = torch.arange(n, device=sorted_keys.device).expand_as(sorted_keys)
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    if n > 1:
        start[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


def _compact(vals: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Move the valid entries of each row to the front (order kept), PAD after. [R, N] -> [R, max count]."""
    R, N = vals.shape
    width = int(valid.sum(-1).max()) if valid.numel() else 0
    pos = torch.where(valid, valid.cumsum(-1) - 1, torch.full_like(vals, width))
    out = torch.full((R, width + 1), PAD, dtype=vals.dtype, device=vals.device)
    out.scatter_(1, pos, torch.where(valid, vals, torch.full_like(vals, PAD)))
    return out[:, :width]


def _unique_rows(vals: torch.Tensor) -> torch.Tensor:
    """Distinct non-PAD values of each row, ascending, PAD-padded. [R, N] int64 -> [R, max count]."""
    if vals.shape[-1] == 0:
        return vals
    s = vals.sort(-1).values
    keep = s >= 0
    keep[:, 1:] &= s[:, 1:] != s[:, :-1]
    return _compact(s, keep)
