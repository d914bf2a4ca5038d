"""Page load: copy selected pages of a (pinned host or device) page pool into device slots, in one kernel.

Each program copies one block of one page's K and V rows from ``src[b, h, ids[b, h, j]]`` to
``dst[b, h, slots[b, h, j]]`` (and the page's valid length), skipping ``ids < 0``. The kernel reads the page
ids and slots from device memory, so nothing is read back to the host: when the source pool is pinned host
memory, the GPU reads it directly over PCIe through unified virtual addressing (pinned allocations are
mapped into the device's address space), so no host-side gather, staging copy or synchronisation is needed.

``load_pages_reference`` is the torch definition the kernel is tested against (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["load_pages", "load_pages_reference"]


@triton.jit
def _load_pages_kernel(
    src_k, src_v, src_len,  # [B*H*C, ROW], [B*H*C, ROW], [B*H*C] int32  (host pinned or device)
    ids, slots,  # [B*H*K] int64: source page, destination slot (ids < 0: skip)
    dst_k, dst_v, dst_len,  # [B*H*N, ROW], [B*H*N, ROW], [B*H*N] int32 (device)
    K, C, N,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # one (b, h, j) entry
    blk = tl.program_id(1)  # one BLOCK of the page's S*D elements
    bh = pid // K
    page = tl.load(ids + pid)
    slot = tl.load(slots + pid)
    ok = page >= 0
    src = (bh * C + tl.maximum(page, 0)).to(tl.int64) * ROW
    dst = (bh * N + tl.maximum(slot, 0)).to(tl.int64) * ROW
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < tl.where(ok, ROW, 0)  # nothing to copy for a skipped entry
    tl.store(dst_k + dst + offs, tl.load(src_k + src + offs, mask=m), mask=m)
    tl.store(dst_v + dst + offs, tl.load(src_v + src + offs, mask=m), mask=m)
    if blk == 0:
        ln = tl.load(src_len + bh * C + tl.maximum(page, 0), mask=ok)
        tl.store(dst_len + bh * N + tl.maximum(slot, 0), ln, mask=ok)


def _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len) -> tuple[int, int, int, int, int, int, int]:
    if src_k.dim() != 5 or dst_k.dim() != 5:
        raise ValueError(f"pools must be [B, H, C, S, D]; got {tuple(src_k.shape)} and {tuple(dst_k.shape)}")
    B, H, C, S, D = src_k.shape
    if src_v.shape != src_k.shape or dst_v.shape != dst_k.shape:
        raise ValueError("K and V pools must have the same shape")
    if dst_k.shape[:2] != (B, H) or dst_k.shape[3:] != (S, D):
        raise ValueError(f"destination pool {tuple(dst_k.shape)} does not match source pool {tuple(src_k.shape)}")
    if src_k.dtype != dst_k.dtype:
        raise TypeError(f"source and destination dtypes differ: {src_k.dtype} vs {dst_k.dtype}")
    if ids.shape != slots.shape or ids.dim() != 3 or ids.shape[:2] != (B, H):
        raise ValueError(f"ids {tuple(ids.shape)} and slots {tuple(slots.shape)} must both be [B={B}, H={H}, K]")
    if src_len.shape != (B, H, C) or dst_len.shape != (B, H, dst_k.shape[2]):
        raise ValueError("lengths must be [B, H, C] (source) and [B, H, N] (destination)")
    return B, H, C, dst_k.shape[2], S, D, ids.shape[2]


def load_pages_reference(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len) -> None:
    """Torch definition: ``dst[b, h, slots[b, h, j]] = src[b, h, ids[b, h, j]]`` where ``ids >= 0``."""
    B, H, C, N, S, D, K = _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len)
    sd, dd = src_k.device, dst_k.device
    rows = torch.arange(B * H, device=ids.device).view(B, H, 1)
    ok = (ids >= 0).reshape(-1)
    src = (rows * C + ids.clamp(min=0)).reshape(-1)[ok]
    dst = (rows * N + slots.clamp(min=0)).reshape(-1)[ok]
    for s, d in ((src_k, dst_k), (src_v, dst_v)):
        d.view(B * H * N, S * D).index_copy_(0, dst.to(dd), s.view(B * H * C, S * D).index_select(0, src.to(sd)).to(dd))
    dst_len.view(-1).index_copy_(0, dst.to(dd), src_len.reshape(-1).index_select(0, src.to(sd)).to(dd))


def load_pages(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, *, block: int = 1024) -> None:
    """Launch the page-load kernel on the current CUDA stream (asynchronous; no host synchronisation).

    src_k, src_v: [B, H, C, S, D] pinned host or device; src_len: [B, H, C] int32 (same memory kind);
    ids, slots: [B, H, K] int64 on the device; dst_k, dst_v: [B, H, N, S, D] device; dst_len: [B, H, N] int32.
    Page ids must be < C and slots < N where ids >= 0 (not checked: checking would read back from the device).
    """
    B, H, C, N, S, D, K = _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len)
    if dst_k.device.type != "cuda" or ids.device.type != "cuda" or slots.device.type != "cuda":
        raise ValueError("load_pages needs the destination pool, ids and slots on a CUDA device")
    for name, t in (("src_k", src_k), ("src_v", src_v), ("src_len", src_len)):
        if t.device.type == "cpu" and not t.is_pinned():
            raise ValueError(f"{name} is in pageable host memory; the GPU can only read pinned host memory")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if src_len.dtype != torch.int32 or dst_len.dtype != torch.int32:
        raise TypeError("page lengths must be int32")
    if B * H * K == 0:
        return
    row = S * D
    blk = min(block, triton.next_power_of_2(row))
    grid = (B * H * K, triton.cdiv(row, blk))
    _load_pages_kernel[grid](
        src_k, src_v, src_len, ids.contiguous(), slots.contiguous(), dst_k, dst_v, dst_len,
        K, C, N, ROW=row, BLOCK=blk,
    )
