"""``sync``: a plain blocking page copy (gather, copy, scatter) on the current stream; an fp8 pool's pages cross
as fp8 and are dequantised on the destination device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Transfer
from kvpolicy.pool import PagePool
from kvpolicy.pool_dtype import dequantize
from kvpolicy.types import TransferHandle

__all__ = ["SyncTransfer", "check_transfer_args", "page_rows"]


def check_transfer_args(src_pool: PagePool, src_ids: torch.Tensor, dst_pool: PagePool, dst_slots: torch.Tensor):
    """Validate a ``Transfer.submit`` call; returns (src_ids, dst_slots) as int64 on the CPU."""
    if src_ids.shape != dst_slots.shape or src_ids.dim() != 3:
        raise ValueError(
            f"src_ids {tuple(src_ids.shape)} and dst_slots {tuple(dst_slots.shape)} must both be [B, Hkv, K]"
        )
    for a, b, what in (
        (src_pool.page_size, dst_pool.page_size, "page size"),
        (src_pool.head_dim, dst_pool.head_dim, "head dim"),
        (src_pool.dtype, dst_pool.dtype, "dtype"),
        (src_pool.num_kv_heads, dst_pool.num_kv_heads, "KV heads"),
    ):
        if a != b:
            raise ValueError(f"source and destination pools differ in {what}: {a} vs {b}")
    if tuple(src_ids.shape[:2]) != (src_pool.batch_size, src_pool.num_kv_heads):
        raise ValueError(f"src_ids rows {tuple(src_ids.shape[:2])} do not match the pools' [B, Hkv]")
    src_ids, dst_slots = src_ids.long().cpu(), dst_slots.long().cpu()
    move = src_ids >= 0
    if bool((dst_slots[move] < 0).any()) or bool((dst_slots[move] >= dst_pool.capacity).any()):
        raise ValueError(f"dst_slots out of range [0, {dst_pool.capacity}) for a page to move")
    if bool((src_ids[move] >= src_pool.capacity).any()):
        raise ValueError(f"src_ids out of range [0, {src_pool.capacity})")
    return src_ids, dst_slots


def page_rows(src_ids: torch.Tensor, dst_slots: torch.Tensor):
    """Flatten the pages to move: returns (b, h, src page, dst slot) index vectors, each [M] int64."""
    b, h, j = (src_ids >= 0).nonzero(as_tuple=True)
    return b, h, src_ids[b, h, j], dst_slots[b, h, j]


@dataclass(kw_only=True)
class SyncTransfer(Transfer):
    """Gathers the pages, copies them to the destination device and scatters them into their slots, all
    on the caller's stream; ``wait`` has nothing to do. The baseline that asynchronous transfers beat."""

    name: ClassVar[str] = "sync"

    def submit(self, src_pool, src_ids, dst_pool, dst_slots) -> TransferHandle:
        src_ids, dst_slots = check_transfer_args(src_pool, src_ids, dst_pool, dst_slots)
        b, h, p, s = page_rows(src_ids, dst_slots)
        if b.numel() == 0:
            return TransferHandle(num_pages=0, nbytes=0)
        sd, dd = src_pool.device, dst_pool.device
        rows = b * src_pool.num_kv_heads + h
        k, v, ks, vs = src_pool.gather_raw(rows, p)  # [M, S, D] as stored, scales [M] (fp8) or None
        ln = src_pool.lengths[b.to(sd), h.to(sd), p.to(sd)]
        nbytes = k.nbytes + v.nbytes + (ks.nbytes + vs.nbytes if ks is not None else 0)
        bd, hd, sdst = b.to(dd), h.to(dd), s.to(dd)
        dst_pool.k[bd, hd, sdst] = dequantize(k.to(dd), None if ks is None else ks.to(dd), dst_pool.dtype)
        dst_pool.v[bd, hd, sdst] = dequantize(v.to(dd), None if vs is None else vs.to(dd), dst_pool.dtype)
        dst_pool.lengths[bd, hd, sdst] = ln.to(dd)
        return TransferHandle(num_pages=int(b.numel()), nbytes=nbytes)

    def wait(self, handle: TransferHandle) -> None:
        return None
