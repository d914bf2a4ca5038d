"""GQA merge of page rankings in one kernel (the definition is ``kvpolicy.ops.gqa_merge_reference``).

One program per (batch row, KV head): the group's rankings are read rank-major (rank 0 of every query head,
then rank 1, ...), an entry is kept if it is valid and no earlier entry holds the same page (a pairwise
comparison, ``L = G * R <= MAX_ENTRIES``), and output position ``p`` takes the ``p``-th kept entry. The torch
definition sorts twice and takes ~25 launches; this is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ENTRIES", "gqa_merge_triton"]

MAX_ENTRIES = 256  # G * R per row; the pairwise comparison holds L^2 flags per program


@triton.jit
def _gqa_merge_kernel(
    ranked,  # [rows, G, R] int64 (contiguous), PAD (-1) padded, best first
    out,  # [rows, KO] int64
    G, R, KO,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_L)
    L = G * R
    inb = i < L
    # rank-major entry i = rank r of query head g: r = i // G, g = i % G
    v = tl.load(ranked + row * L + (i % G) * R + i // G, mask=inb, other=-1)
    valid = v >= 0
    j = tl.arange(0, BLOCK_L)
    vj = tl.load(ranked + row * L + (j % G) * R + j // G, mask=j < L, other=-1)
    earlier = (j[None, :] < i[:, None]) & (vj[None, :] == v[:, None])  # [BL, BL]: j before i, same page
    keep = valid & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # output position of each kept entry
    p = tl.arange(0, BLOCK_K)
    hit = keep[None, :] & (pos[None, :] == p[:, None])  # [BK, BL]
    found = tl.sum(hit.to(tl.int32), axis=1) > 0
    val = tl.sum(tl.where(hit, v[None, :], 0), axis=1)
    tl.store(out + row * KO + p, tl.where(found, val, -1), mask=p < KO)


def gqa_merge_triton(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """ranked: [B, Hkv, G, R] int64 on the device -> [B, Hkv, min(k, G*R)] (see the module docstring)."""
    B, H, G, R = ranked.shape
    L = G * R
    if L > MAX_ENTRIES:
        raise ValueError(f"gqa_merge_triton handles at most {MAX_ENTRIES} entries per row (G * R), got {L}")
    ko = min(k, L)
    out = torch.empty((B, H, ko), dtype=torch.int64, device=ranked.device)
    if B * H and ko:
        _gqa_merge_kernel[(B * H,)](ranked.long().contiguous(), out, G, R, ko,
                                    BLOCK_L=max(16, triton.next_power_of_2(L)),
                                    BLOCK_K=max(16, triton.next_power_of_2(ko)))
    return out
