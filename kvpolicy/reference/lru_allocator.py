"""``lru``: GPU slots per (batch row, KV head), least-recently-used eviction, pin while reserved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import PageAllocator
from kvpolicy.ops import storage_key, triton_available
from kvpolicy.types import PAD, Reservation, Selection

__all__ = ["LRUAllocator"]


@dataclass(kw_only=True)
class LRUAllocator(PageAllocator):
    """A slot table in the style of a block pool: resident pages keep their slot across steps, so a page
    selected again is not copied again; when a slot is needed, the least recently used unpinned slot
    (a free one first) is taken. Fully vectorised over (b, head): no Python loop per page.

    On a GPU nothing is read back to the host: tables carry one extra "trash" column that masked-out
    entries are scattered into, instead of boolean indexing. ``check`` (default: on for CPU tables) turns on
    the contract checks that need such reads (too many pages for the slots, double release).

    ``kernel``: reserve through the one-launch Triton kernel ``kvpolicy_kernels.lru_reserve`` (same result as the
    torch code below, which is its reference). ``None`` (default): on CUDA tables when triton is installed,
    checks are off and the row has at most ``kvpolicy_kernels.lru_reserve.MAX_SLOTS`` slots; ``True`` forces it
    (the Triton interpreter runs it on CPU), ``False`` never.
    """

    name: ClassVar[str] = "lru"
    check: bool | None = None
    kernel: bool | None = None

    def __post_init__(self) -> None:
        self.setup(0, 0, 0, "cpu")

    def setup(self, batch_size: int, num_kv_heads: int, num_slots: int, device: torch.device | str) -> None:
        if min(batch_size, num_kv_heads, num_slots) < 0:
            raise ValueError("batch_size, num_kv_heads and num_slots must be >= 0")
        self.device = torch.device(device)
        B, H, N = batch_size, num_kv_heads, num_slots
        self.num_slots = N
        # per slot (column N is the trash column): page held, last use (0 = never), pin count
        self._slot_page = torch.full((B, H, N + 1), PAD, dtype=torch.int64, device=self.device)
        self._last_used = torch.zeros((B, H, N + 1), dtype=torch.int64, device=self.device)
        self._pins = torch.zeros((B, H, N + 1), dtype=torch.int32, device=self.device)
        self._page_slot = torch.full((B, H, 1), PAD, dtype=torch.int64, device=self.device)  # per page (+ trash)
        self._sized = False  # True once ensure_pages() gave a bound on page ids (no read-back in lookup)
        self._clock = torch.zeros(1, dtype=torch.int64, device=self.device)  # time stamp, on the device (capturable)

    def reset(self) -> None:
        B, H, N1 = self._slot_page.shape
        self.setup(B, H, N1 - 1, self.device)

    @property
    def _checking(self) -> bool:
        return self.device.type == "cpu" if self.check is None else self.check

    @property
    def num_free(self) -> torch.Tensor:
        return (self._slot_page[..., : self.num_slots] < 0).sum(-1)

    def ensure_pages(self, num_pages: int) -> None:
        self._grow(num_pages)
        self._sized = True

    def _grow(self, pages: int) -> None:
        P = self._page_slot.shape[-1] - 1
        if pages > P:
            B, H, _ = self._page_slot.shape
            new = torch.full((B, H, max(pages, 2 * P, 16) + 1), PAD, dtype=torch.int64, device=self.device)
            new[:, :, :P] = self._page_slot[:, :, :P]
            self._page_slot = new

    def lookup(self, page_ids: torch.Tensor) -> torch.Tensor:
        ids = page_ids.to(self.device)
        if not self._sized and ids.numel():
            self._grow(int(ids.max()) + 1)
        P = self._page_slot.shape[-1] - 1
        slots = self._page_slot.gather(-1, ids.clamp(min=0, max=P))
        return torch.where(ids >= 0, slots, PAD)

    def _trash(self, cond: torch.Tensor, idx: torch.Tensor, trash: int) -> torch.Tensor:
        return torch.where(cond, idx, trash)

    def _use_kernel(self, N: int) -> bool:
        if self.kernel is not None:
            return self.kernel
        if self.device.type != "cuda" or self._checking or not triton_available():
            return False
        from kvpolicy_kernels.lru_reserve import MAX_SLOTS

        return N <= MAX_SLOTS

    def capture_key(self) -> tuple | None:
        """The kernel path is capturable (its clock is a device tensor); the key pins the tables' storage."""
        if not self._use_kernel(self.num_slots):
            return None
        return storage_key(self._slot_page, self._last_used, self._pins, self._page_slot, self._clock)

    def reserve(self, selection: Selection) -> Reservation:
        ids = selection.page_ids.to(self.device)  # [B, H, K]
        B, H, N1 = self._slot_page.shape
        N = N1 - 1
        if ids.shape[:2] != (B, H):
            raise ValueError(f"selection rows {tuple(ids.shape[:2])} do not match the allocator's {(B, H)}")
        K = ids.shape[-1]
        if self._checking and K > N and bool(((ids >= 0).sum(-1) > N).any()):
            raise ValueError(f"selection holds up to {int((ids >= 0).sum(-1).max())} pages but only {N} GPU slots exist")
        if not self._sized and ids.numel():
            self._grow(int(ids.max()) + 1)
        if self._use_kernel(N):
            from kvpolicy_kernels.lru_reserve import lru_reserve

            ids = ids.long().contiguous()
            self._clock += 1
            slots, missing, evicted = lru_reserve(self._slot_page, self._last_used, self._pins, self._page_slot,
                                                  ids, self._clock)
            return Reservation(page_ids=ids, slots=slots, missing=missing, evicted=evicted)
        self._clock += 1
        valid = ids >= 0
        cur = self.lookup(ids)  # [B, H, K]
        P = self._page_slot.shape[-1] - 1
        hit = valid & (cur >= 0)
        missing = valid & ~hit
        # candidate slots for missing pages: not pinned and not holding a page selected now; free, then LRU
        held = self._pins > 0
        held.scatter_(-1, self._trash(hit, cur, N), True)
        held = held[..., :N]
        order_key = torch.where(self._slot_page[..., :N] < 0, -1, self._last_used[..., :N])
        order_key = torch.where(held, torch.iinfo(torch.int64).max, order_key)
        cand = order_key.argsort(dim=-1, stable=True)  # [B, H, N] best slot first
        if self._checking and bool((missing.sum(-1) > (~held).sum(-1)).any()):
            raise RuntimeError("no evictable GPU slot left: release earlier reservations first")
        rank = (missing.long().cumsum(-1) - 1).clamp(min=0, max=max(N - 1, 0))  # [B, H, K]
        new_slot = cand.gather(-1, rank) if N else torch.full_like(ids, PAD)
        slots = torch.where(hit, cur, torch.where(missing, new_slot, PAD))
        evicted = torch.where(missing, self._slot_page.gather(-1, slots.clamp(min=0, max=N)), PAD)
        # update tables (masked entries go to the trash columns): drop evicted pages, install missing ones,
        # stamp and pin every selected slot
        self._page_slot.scatter_(-1, self._trash(evicted >= 0, evicted, P), PAD)
        self._page_slot.scatter_(-1, self._trash(missing, ids.clamp(max=P), P), slots)
        self._slot_page.scatter_(-1, self._trash(missing, slots, N), ids)
        sel_slot = self._trash(valid, slots, N)
        self._last_used.scatter_(-1, sel_slot, self._clock.expand(sel_slot.shape))
        self._pins.scatter_add_(-1, sel_slot, valid.to(torch.int32))
        self._reset_trash()
        return Reservation(page_ids=ids, slots=slots, missing=missing, evicted=evicted)

    def _reset_trash(self) -> None:
        self._slot_page[..., -1] = PAD
        self._last_used[..., -1] = 0
        self._pins[..., -1] = 0
        self._page_slot[..., -1] = PAD

    def release(self, reservation: Reservation) -> None:
        slots = reservation.slots.to(self.device)
        valid = slots >= 0
        idx = self._trash(valid, slots, self.num_slots)
        if self._checking and bool((self._pins.gather(-1, idx)[valid] <= 0).any()):
            raise ValueError("release() of a reservation that was not reserved (or was released twice)")
        self._pins.scatter_add_(-1, idx, -valid.to(torch.int32))
        self._pins[..., -1] = 0  # the only table written here

    def invalidate(self, page_ids: torch.Tensor) -> None:
        ids = page_ids.to(self.device)
        slots = self.lookup(ids)
        has = slots >= 0
        N, P = self.num_slots, self._page_slot.shape[-1] - 1
        self._slot_page.scatter_(-1, self._trash(has, slots, N), PAD)
        self._last_used.scatter_(-1, self._trash(has, slots, N), 0)
        self._page_slot.scatter_(-1, self._trash(has, ids.clamp(max=P), P), PAD)
        self._reset_trash()
