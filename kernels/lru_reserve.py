"""LRU slot reservation in one kernel: the ``lru`` allocator's ``reserve`` for every (batch row, KV head) at once.

The torch definition (``kvpolicy.reference.lru_allocator.LRUAllocator.reserve`` with ``kernel=False``) takes
about 40 small tensor operations per call; on a GPU each is a launch that costs host time, per layer and step
(``docs/decode.md`` has the measurement). Here one program per row does the whole reservation in registers:

1. look up each selected page's slot (``page_slot``): a hit keeps its slot;
2. rank the row's slots by (free first, then least recently used, then slot index), with pinned slots and
   slots holding a page selected now excluded, by comparing every pair of slots (``N <= MAX_SLOTS``);
3. give the j-th missing page the j-th ranked slot, evict the page it held;
4. update the tables in place (page -> slot, slot -> page, last use = ``clock``, pin count + 1).

The tables keep the allocator's layout, one trailing "trash" column each, which the kernel neither reads nor
writes. Selected page ids of a row must be distinct (the ``Selection`` contract). The result is identical to
the torch definition, which the tests check on random reservation/release sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_SLOTS", "lru_reserve"]

MAX_SLOTS = 256  # the pairwise slot ranking is O(N^2) registers per program: larger tables use the torch path


@triton.jit
def _lru_reserve_kernel(
    ids,  # [R, K] int64 selected pages (-1: none)
    slot_page, last_used, pins,  # [R, N + 1] int64, int64, int32: page held, last use, pin count (+ trash column)
    page_slot,  # [R, P + 1] int64: slot of each page (-1: not resident) (+ trash column)
    out_slots, out_missing, out_evicted,  # [R, K] int64, bool, int64
    clock_ptr,  # [1] int64: this reservation's time stamp, read on the device
    K, N, P,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    nn = tl.arange(0, BLOCK_N)
    kin = kk < K
    nin = nn < N
    page = tl.load(ids + r * K + kk, mask=kin, other=-1)  # [BK]
    valid = page >= 0
    cur = tl.load(page_slot + r * (P + 1) + tl.minimum(tl.maximum(page, 0), P), mask=valid & (page < P), other=-1)
    hit = valid & (cur >= 0)
    missing = valid & (cur < 0)

    held_page = tl.load(slot_page + r * (N + 1) + nn, mask=nin, other=-1)  # [BN]
    used = tl.load(last_used + r * (N + 1) + nn, mask=nin, other=0)
    pinned = tl.load(pins + r * (N + 1) + nn, mask=nin, other=0) > 0
    # a slot is unavailable if pinned or holding a page selected (and hit) now
    taken = tl.sum((hit[:, None] & (cur[:, None] == nn[None, :])).to(tl.int32), axis=0) > 0  # [BN]
    unavailable = pinned | taken | (nn >= N)
    # ranking key: (class, last use, slot) -- class 0 free, 1 holds a page (by last use), 2 unavailable
    cls = tl.where(unavailable, 2, tl.where(held_page < 0, 0, 1)).to(tl.int64)
    key = cls * 1152921504606846976 + tl.where(cls == 1, used, 0) * BLOCK_N + nn  # class << 60 | use | slot
    pos = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)  # [BN] rank of each slot

    rank = tl.cumsum(missing.to(tl.int32), axis=0) - 1  # [BK] j-th missing page of the row
    rank = tl.minimum(tl.maximum(rank, 0), tl.maximum(N - 1, 0))
    pick = (pos[None, :] == rank[:, None]) & nin[None, :]  # [BK, BN]
    found = tl.sum(pick.to(tl.int32), axis=1) > 0  # false only without a slot (N = 0: the caller's error)
    new_slot = tl.where(found, tl.sum(tl.where(pick, nn[None, :], 0), axis=1).to(tl.int64), -1)
    old_page = tl.where(found, tl.sum(tl.where(pick, held_page[None, :], 0), axis=1), -1)  # held by the pick
    slots = tl.where(hit, cur, tl.where(missing, new_slot, -1))
    evicted = tl.where(missing, old_page, -1)

    tl.store(out_slots + r * K + kk, slots, mask=kin)
    tl.store(out_missing + r * K + kk, missing, mask=kin)
    tl.store(out_evicted + r * K + kk, evicted, mask=kin)
    # table updates (rows are disjoint across programs; evicted pages are never among the selected ones)
    ev = kin & (evicted >= 0)
    tl.store(page_slot + r * (P + 1) + tl.maximum(evicted, 0), tl.full([BLOCK_K], -1, tl.int64), mask=ev)
    ins = kin & missing & (slots >= 0)
    tl.store(page_slot + r * (P + 1) + tl.maximum(page, 0), slots, mask=ins & (page < P))
    tl.store(slot_page + r * (N + 1) + tl.maximum(slots, 0), page, mask=ins)
    sel = kin & valid & (slots >= 0)
    clock = tl.load(clock_ptr)
    tl.store(last_used + r * (N + 1) + tl.maximum(slots, 0), tl.full([BLOCK_K], 0, tl.int64) + clock, mask=sel)
    tl.store(pins + r * (N + 1) + tl.maximum(slots, 0),
             tl.load(pins + r * (N + 1) + tl.maximum(slots, 0), mask=sel, other=0) + 1, mask=sel)


def lru_reserve(
    slot_page: torch.Tensor,  # [B, H, N + 1] int64
    last_used: torch.Tensor,  # [B, H, N + 1] int64
    pins: torch.Tensor,  # [B, H, N + 1] int32
    page_slot: torch.Tensor,  # [B, H, P + 1] int64
    ids: torch.Tensor,  # [B, H, K] int64, distinct per row, < P
    clock: torch.Tensor,  # [1] int64 on the device: the time stamp of this reservation
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # slots [B, H, K] int64, missing bool, evicted int64
    """Reserve slots for ``ids`` and update the tables in place (asynchronous: no host synchronisation; every
    input, the clock included, is read on the device, so the launch can be captured in a CUDA graph).
    The caller guarantees what the torch path checks (enough evictable slots, ids below ``P``)."""
    B, H, N1 = slot_page.shape
    N, P, K = N1 - 1, page_slot.shape[-1] - 1, ids.shape[-1]
    if N > MAX_SLOTS:
        raise ValueError(f"lru_reserve handles at most {MAX_SLOTS} slots per row, got {N}")
    if ids.shape[:2] != (B, H) or page_slot.shape[:2] != (B, H):
        raise ValueError(f"ids {tuple(ids.shape)} / page_slot {tuple(page_slot.shape)} do not match [B={B}, H={H}]")
    for name, t, dt in (("slot_page", slot_page, torch.int64), ("last_used", last_used, torch.int64),
                        ("pins", pins, torch.int32), ("page_slot", page_slot, torch.int64), ("ids", ids, torch.int64),
                        ("clock", clock, torch.int64)):
        if t.dtype != dt or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous {dt} tensor, got {t.dtype}")
    slots = torch.empty_like(ids)
    missing = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    evicted = torch.empty_like(ids)
    if B * H and K:
        bk = max(16, triton.next_power_of_2(K))
        bn = max(16, triton.next_power_of_2(max(N, 1)))
        _lru_reserve_kernel[(B * H,)](ids, slot_page, last_used, pins, page_slot, slots, missing, evicted,
                                      clock, K, N, P, BLOCK_K=bk, BLOCK_N=bn)
    return slots, missing, evicted
