"""``bulk_load``: IceCache's page loading: gather into one pinned staging buffer, one host-to-device copy on a
side stream, scatter into the GPU slots (an fp8 pool's pages are staged and copied as fp8, with their scales, and
dequantised on the device before the scatter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Transfer
from kvpolicy.pool import PagePool
from kvpolicy.pool_dtype import dequantize
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
        self._host: torch.Tensor | None = None  # [2, M, S*D] pinned staging (K rows then V rows), as stored
        self._dev: torch.Tensor | None = None  # [2, M, S*D] on the destination device, as stored
        self._host_scale: torch.Tensor | None = None  # fp8 pools: [2, M] float32 pinned (K then V scales)
        self._dev_scale: torch.Tensor | None = None  # fp8 pools: [2, M] float32 on the destination device
        self._stream = None
        self._last_event = None  # the previous copy: the staging buffer is reused only after it finished

    def _buffers(self, m: int, src: PagePool, dst: PagePool) -> tuple[torch.Tensor, torch.Tensor]:
        row = src.page_size * src.head_dim
        h = self._host
        if (h is None or h.shape[1] < m or h.shape[2] != row or h.dtype != src.storage_dtype
                or self._dev.device != dst.device or (self._host_scale is not None) != src.fp8):
            cap = max(m, self.initial_pages, 2 * (h.shape[1] if h is not None and h.shape[2] == row else 0))
            pin = dst.device.type == "cuda"
            self._host = torch.empty((2, cap, row), dtype=src.storage_dtype, device="cpu", pin_memory=pin)
            self._dev = torch.empty((2, cap, row), dtype=src.storage_dtype, device=dst.device)
            self._host_scale = torch.empty((2, cap), dtype=torch.float32, pin_memory=pin) if src.fp8 else None
            self._dev_scale = torch.empty((2, cap), dtype=torch.float32, device=dst.device) if src.fp8 else None
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
        H = src_pool.num_kv_heads
        row = src_pool.page_size * src_pool.head_dim
        _, _, ks, vs = src_pool.gather_raw(b * H + h, p, out=(host[0, :m], host[1, :m]))
        scales = self._host_scale
        if scales is not None:
            scales[0, :m].copy_(ks)
            scales[1, :m].copy_(vs)
        lengths = src_pool.lengths[b, h, p]
        N = dst_pool.capacity
        dflat = ((b * H + h) * N + s).to(dst_pool.device, non_blocking=True)
        nbytes = 2 * m * row * host.element_size() + (2 * m * 4 if scales is not None else 0)
        handle = TransferHandle(num_pages=m, nbytes=nbytes)
        if dst_pool.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=dst_pool.device)
            self._stream.wait_stream(torch.cuda.current_stream(dst_pool.device))  # the slots are free to overwrite
            with torch.cuda.stream(self._stream):
                dev[:, :m].copy_(host[:, :m], non_blocking=True)
                if scales is not None:
                    self._dev_scale[:, :m].copy_(scales[:, :m], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            handle.event, handle.stream = event, self._stream
            self._last_event = event
        else:
            dev[:, :m].copy_(host[:, :m])
            if scales is not None:
                self._dev_scale[:, :m].copy_(scales[:, :m])
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
        for i, pool in enumerate((dst_pool.k, dst_pool.v)):
            scale = self._dev_scale[i, :m] if self._dev_scale is not None else None  # [m]
            pages = dequantize(self._dev[i, :m, None], scale, dst_pool.dtype)  # [m, 1, S*D] -> the slots' dtype
            pool.view(-1, row).index_copy_(0, dflat, pages.view(m, row))
        dst_pool.lengths.view(-1).index_copy_(0, dflat, lengths)
        handle.pending = None
