"""``bulk_load``: IceCache's page loading: gather into one pinned staging buffer, one host-to-device copy on a
side stream, scatter into the GPU slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Transfer
from kvpolicy.pool import PagePool
from kvpolicy.transfers.sync_transfer import check_transfer_args, page_rows
from kvpolicy.types import TransferHandle

__all__ = ["BulkLoadTransfer"]


@dataclass(kw_only=True)
class BulkLoadTransfer(Transfer):
    """Moves only the requested pages, in bulk (reference: ``copy_to_buffer`` + one ``copy_`` on a copy stream
    + ``scatter_pages`` in yuzhenmao/IceCache ``infer_state.py``).

    1. gather the pages' K, V (and lengths) from the CPU pool into a pinned staging buffer that is allocated
       once and grown by doubling (``index_select(out=...)``, no allocation per step);
    2. one non-blocking host-to-device copy of the staging buffer on a side stream, followed by an event;
    3. ``wait`` makes the current stream wait for the event (no host synchronisation) and scatters the pages
       into their slots on the current stream.

    On a CPU-only machine the same steps run without streams. ``initial_pages`` sizes the first buffers.
    """

    name: ClassVar[str] = "bulk_load"
    initial_pages: int = 64

    def __post_init__(self) -> None:
        if self.initial_pages < 1:
            raise ValueError(f"initial_pages must be >= 1, got {self.initial_pages}")
        self._host: torch.Tensor | None = None  # [2, M, S*D] pinned staging (K rows then V rows)
        self._dev: torch.Tensor | None = None  # [2, M, S*D] on the destination device
        self._stream = None
        self._last_event = None  # the previous copy: the staging buffer is reused only after it finished

    def _buffers(self, m: int, src: PagePool, dst: PagePool) -> tuple[torch.Tensor, torch.Tensor]:
        row = src.page_size * src.head_dim
        h = self._host
        if h is None or h.shape[1] < m or h.shape[2] != row or h.dtype != src.dtype or self._dev.device != dst.device:
            cap = max(m, self.initial_pages, 2 * (h.shape[1] if h is not None and h.shape[2] == row else 0))
            pin = dst.device.type == "cuda"
            self._host = torch.empty((2, cap, row), dtype=src.dtype, device="cpu", pin_memory=pin)
            self._dev = torch.empty((2, cap, row), dtype=src.dtype, device=dst.device)
        return self._host, self._dev

    def submit(self, src_pool, src_ids, dst_pool, dst_slots) -> TransferHandle:
        src_ids, dst_slots = check_transfer_args(src_pool, src_ids, dst_pool, dst_slots)
        b, h, p, s = page_rows(src_ids, dst_slots)
        m = int(b.numel())
        if m == 0:
            return TransferHandle(num_pages=0, nbytes=0)
        if self._last_event is not None:
            self._last_event.synchronize()  # host staging is about to be overwritten
        host, dev = self._buffers(m, src_pool, dst_pool)
        C, H = src_pool.capacity, src_pool.num_kv_heads
        flat = (b * H + h) * C + p  # [M] flat page index into the CPU pool
        row = src_pool.page_size * src_pool.head_dim
        torch.index_select(src_pool.k.view(-1, row), 0, flat, out=host[0, :m])
        torch.index_select(src_pool.v.view(-1, row), 0, flat, out=host[1, :m])
        lengths = src_pool.lengths.view(-1).index_select(0, flat)
        N = dst_pool.capacity
        dflat = ((b * H + h) * N + s).to(dst_pool.device, non_blocking=True)
        handle = TransferHandle(num_pages=m, nbytes=2 * m * row * host.element_size())
        if dst_pool.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=dst_pool.device)
            self._stream.wait_stream(torch.cuda.current_stream(dst_pool.device))  # the slots are free to overwrite
            with torch.cuda.stream(self._stream):
                dev[:, :m].copy_(host[:, :m], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            handle.event, handle.stream = event, self._stream
            self._last_event = event
        else:
            dev[:, :m].copy_(host[:, :m])
        handle.pending = (dst_pool, dflat, lengths.to(dst_pool.device, non_blocking=True), m)
        return handle

    def wait(self, handle: TransferHandle) -> None:
        pending = getattr(handle, "pending", None)
        if pending is None:
            return
        dst_pool, dflat, lengths, m = pending
        if handle.event is not None:
            torch.cuda.current_stream(dst_pool.device).wait_event(handle.event)
        row = dst_pool.page_size * dst_pool.head_dim
        dst_pool.k.view(-1, row).index_copy_(0, dflat, self._dev[0, :m])
        dst_pool.v.view(-1, row).index_copy_(0, dflat, self._dev[1, :m])
        dst_pool.lengths.view(-1).index_copy_(0, dflat, lengths)
        handle.pending = None
