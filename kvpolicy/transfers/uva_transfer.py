"""``uva``: the GPU reads the selected pages straight out of the pinned CPU pool (one kernel per layer-step).

Where ``bulk_load`` gathers on the host (which needs the page ids on the host: a device-to-host read and a
synchronisation per step), this transfer launches ``kvpolicy_kernels.page_load`` on the current stream with the page
ids and slots where they already are, on the device. Nothing waits for the device; ``wait`` has nothing to do
(the copy is ordered before the attention on the same stream). The kernel finds the pool's chunks through
their address tables (``PagePool.chunk_tables``) and dequantises an fp8 pool as it copies, so only the fp8 bytes
cross PCIe. Without CUDA, Triton, or a pinned source pool (or, for an fp8 pool, a GPU with fp8 conversions:
compute capability 8.9, Ada/Hopper, or newer) it falls back to the plain copy of ``sync``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Transfer
from kvpolicy.ops import storage_key
from kvpolicy.transfers.sync_transfer import SyncTransfer, check_transfer_args
from kvpolicy.types import TransferHandle

__all__ = ["UVATransfer"]


def _kernel_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass(kw_only=True)
class UVATransfer(Transfer):
    """Zero-copy page loading through unified virtual addressing (see the module docstring).

    ``check``: validate ids and slots on the host first (reads them back: a synchronisation; for tests).
    ``num_pages``/``nbytes`` of the handle are 0-dim device tensors (read them only when needed).
    """

    name: ClassVar[str] = "uva"
    check: bool = False

    def __post_init__(self) -> None:
        self._fallback = SyncTransfer()

    def _direct(self, src_pool, dst_pool) -> bool:
        src_ok = src_pool.device.type == "cuda" or src_pool.pinned
        if not (dst_pool.device.type == "cuda" and src_ok and _kernel_available()):
            return False
        return not src_pool.fp8 or torch.cuda.get_device_capability(dst_pool.device) >= (8, 9)

    def submit(self, src_pool, src_ids, dst_pool, dst_slots) -> TransferHandle:
        if not self._direct(src_pool, dst_pool):
            return self._fallback.submit(src_pool, src_ids, dst_pool, dst_slots)
        if self.check:
            check_transfer_args(src_pool, src_ids, dst_pool, dst_slots)
        elif src_ids.shape != dst_slots.shape or src_ids.dim() != 3:
            raise ValueError(
                f"src_ids {tuple(src_ids.shape)} and dst_slots {tuple(dst_slots.shape)} must both be [B, Hkv, K]"
            )
        from kvpolicy_kernels.page_load import load_pages

        dev = dst_pool.device
        ids = src_ids.to(dev, torch.int64, non_blocking=True)
        slots = dst_slots.to(dev, torch.int64, non_blocking=True)
        load_pages(src_pool.k_chunks, src_pool.v_chunks, src_pool.lengths, ids, slots, dst_pool.k, dst_pool.v,
                   dst_pool.lengths, k_scale=src_pool.k_scale, v_scale=src_pool.v_scale,
                   tables=src_pool.chunk_tables(dev))
        n = (ids >= 0).sum()
        return TransferHandle(num_pages=n, nbytes=n * src_pool.page_nbytes())

    def wait(self, handle: TransferHandle) -> None:
        return None

    def capture_key(self, src_pool, dst_pool) -> tuple | None:
        """The direct path is one kernel and two small reductions: capturable; the key pins both pools (the source
        through its chunk tables, which a growth replaces, and its per-page metadata)."""
        if self.check or not self._direct(src_pool, dst_pool):
            return None
        meta = [t for t in (src_pool.lengths, src_pool.k_scale, src_pool.v_scale) if t is not None]
        return storage_key(*src_pool.chunk_tables(dst_pool.device), *meta, dst_pool.k, dst_pool.v, dst_pool.lengths)
