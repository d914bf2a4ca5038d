"""``lru``: GPU slots per (batch row, KV head), least-recently-used eviction, pin while reserved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import PageAllocator
from kvpolicy.types import PAD, Reservation, Selection

__all__ = ["LRUAllocator"]


@dataclass(kw_only=True)
class LRUAllocator(PageAllocator):
    """A slot table in the style of a block pool: resident pages keep their slot across steps, so a page
    selected again is not copied again; when a slot is needed, the least recently used unpinned slot
    (a free one first) is taken. Fully vectorised over (b, head): no Python loop per page."""

    name: ClassVar[str] = "lru"

    def __post_init__(self) -> None:
        self.setup(0, 0, 0, "cpu")

    def setup(self, batch_size: int, num_kv_heads: int, num_slots: int, device: torch.device | str) -> None:
        if min(batch_size, num_kv_heads, num_slots) < 0:
            raise ValueError("batch_size, num_kv_heads and num_slots must be >= 0")
        self.device = torch.device(device)
        B, H, N = batch_size, num_kv_heads, num_slots
        self.num_slots = N
        self._slot_page = torch.full((B, H, N), PAD, dtype=torch.int64, device=self.device)  # page in slot
        self._last_used = torch.zeros((B, H, N), dtype=torch.int64, device=self.device)  # 0 = never
        self._pins = torch.zeros((B, H, N), dtype=torch.int32, device=self.device)
        self._page_slot = torch.full((B, H, 0), PAD, dtype=torch.int64, device=self.device)  # slot of page
        self._clock = 0

    def reset(self) -> None:
        B, H, N = self._slot_page.shape
        self.setup(B, H, N, self.device)

    @property
    def num_free(self) -> torch.Tensor:
        return (self._slot_page < 0).sum(-1)

    def _grow(self, pages: int) -> None:
        P = self._page_slot.shape[-1]
        if pages > P:
            B, H, _ = self._page_slot.shape
            new = torch.full((B, H, max(pages, 2 * P, 16)), PAD, dtype=torch.int64, device=self.device)
            new[:, :, :P] = self._page_slot
            self._page_slot = new

    def lookup(self, page_ids: torch.Tensor) -> torch.Tensor:
        ids = page_ids.to(self.device)
        self._grow(int(ids.max()) + 1 if ids.numel() else 0)
        slots = self._page_slot.gather(-1, ids.clamp(min=0))
        return torch.where(ids >= 0, slots, PAD)

    def reserve(self, selection: Selection) -> Reservation:
        ids = selection.page_ids.to(self.device)  # [B, H, K]
        B, H, N = self._slot_page.shape
        if ids.shape[:2] != (B, H):
            raise ValueError(f"selection rows {tuple(ids.shape[:2])} do not match the allocator's {(B, H)}")
        K = ids.shape[-1]
        valid = ids >= 0
        if K > N and bool((valid.sum(-1) > N).any()):
            raise ValueError(f"selection holds up to {int(valid.sum(-1).max())} pages but only {N} GPU slots exist")
        cur = self.lookup(ids)  # [B, H, K]
        hit = valid & (cur >= 0)
        missing = valid & ~hit
        self._clock += 1
        # candidate slots for missing pages: not pinned and not holding a page selected now; free, then LRU
        bi, hi = self._rows(ids.shape)
        held = self._pins > 0
        held[bi[hit], hi[hit], cur[hit]] = True
        order_key = torch.where(self._slot_page < 0, -1, self._last_used)
        order_key = torch.where(held, torch.iinfo(torch.int64).max, order_key)
        cand = order_key.argsort(dim=-1, stable=True)  # [B, H, N] best slot first
        if bool((missing.sum(-1) > (~held).sum(-1)).any()):
            raise RuntimeError("no evictable GPU slot left: release earlier reservations first")
        rank = (missing.long().cumsum(-1) - 1).clamp(min=0, max=max(N - 1, 0))  # [B, H, K]
        new_slot = cand.gather(-1, rank) if N else torch.full_like(ids, PAD)
        slots = torch.where(hit, cur, torch.where(missing, new_slot, PAD))
        evicted = torch.full_like(ids, PAD)
        evicted[missing] = self._slot_page[bi[missing], hi[missing], slots[missing]]
        # update tables: drop evicted pages, install missing ones, stamp and pin every selected slot
        ev = evicted >= 0
        self._page_slot[bi[ev], hi[ev], evicted[ev]] = PAD
        self._page_slot[bi[missing], hi[missing], ids[missing]] = slots[missing]
        self._slot_page[bi[missing], hi[missing], slots[missing]] = ids[missing]
        self._last_used[bi[valid], hi[valid], slots[valid]] = self._clock
        self._pins[bi[valid], hi[valid], slots[valid]] += 1
        return Reservation(page_ids=ids, slots=slots, missing=missing, evicted=evicted)

    def _rows(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, K = shape
        bi = torch.arange(B, device=self.device).view(B, 1, 1).expand(B, H, K)
        hi = torch.arange(H, device=self.device).view(1, H, 1).expand(B, H, K)
        return bi, hi

    def release(self, reservation: Reservation) -> None:
        slots = reservation.slots.to(self.device)
        valid = slots >= 0
        bi, hi = self._rows(slots.shape)
        if bool((self._pins[bi[valid], hi[valid], slots[valid]] <= 0).any()):
            raise ValueError("release() of a reservation that was not reserved (or was released twice)")
        self._pins[bi[valid], hi[valid], slots[valid]] -= 1

    def invalidate(self, page_ids: torch.Tensor) -> None:
        ids = page_ids.to(self.device)
        slots = self.lookup(ids)
        has = slots >= 0
        if not bool(has.any()):
            return
        bi, hi = self._rows(ids.shape)
        self._slot_page[bi[has], hi[has], slots[has]] = PAD
        self._last_used[bi[has], hi[has], slots[has]] = 0
        self._page_slot[bi[has], hi[has], ids[has]] = PAD
