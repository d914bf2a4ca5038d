"""Page load: copy selected pages of a (pinned host or device) page pool into device slots, in one kernel.

Each program copies one block of one page's K and V rows from ``src[b, h, ids[b, h, j]]`` to
``dst[b, h, slots[b, h, j]]`` (and the page's valid length), skipping ``ids < 0``. The kernel reads the page
ids and slots from device memory, so nothing is read back to the host: when the source pool is pinned host
memory, the GPU reads it directly over PCIe through unified virtual addressing (pinned allocations are
mapped into the device's address space), so no host-side gather, staging copy or synchronisation is needed.

The source K and V may be held in **chunks** of ``Cc`` pages (``[B, H, Cc, S, D]`` each; page ``p`` in chunk
``p // Cc`` at ``p % Cc``): the kernel finds a chunk through a small device table of chunk addresses. They may
be **fp8** (float8_e4m3fn) with one float32 scale per (page, head) for K and for V: the kernel dequantises
(``q * scale`` in float32, rounded to the destination dtype) as it copies, so only the fp8 bytes cross PCIe.

``load_pages_reference`` is the torch definition the kernel is tested against (and the CPU path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["chunk_table", "load_pages", "load_pages_reference"]


@triton.jit
def _load_pages_kernel(
    k_tbl, v_tbl,  # [n_chunks] int64: addresses of the source chunks, each [B*H*CC, ROW] (host pinned or device)
    src_ref,  # chunk 0 of K: only its element type is used (the chunks' dtype)
    src_len, k_scale, v_scale,  # [B*H*LC] int32 lengths; float32 scales (read only when FP8)
    ids, slots,  # [B*H*K] int64: source page, destination slot (ids < 0: skip)
    dst_k, dst_v, dst_len,  # [B*H*N, ROW], [B*H*N, ROW], [B*H*N] int32 (device)
    K, CC, LC, N,
    ROW: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr,
):
    pid = tl.program_id(0)  # one (b, h, j) entry
    blk = tl.program_id(1)  # one BLOCK of the page's S*D elements
    bh = pid // K
    page = tl.load(ids + pid)
    slot = tl.load(slots + pid)
    ok = page >= 0
    p = tl.maximum(page, 0)
    chunk = p // CC
    src = (bh * CC + (p - chunk * CC)).to(tl.int64) * ROW
    dst = (bh * N + tl.maximum(slot, 0)).to(tl.int64) * ROW
    kbase = tl.load(k_tbl + chunk).to(src_ref.dtype)  # int64 address -> pointer to the chunks' element type
    vbase = tl.load(v_tbl + chunk).to(src_ref.dtype)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < tl.where(ok, ROW, 0)  # nothing to copy for a skipped entry
    xk = tl.load(kbase + src + offs, mask=m)
    xv = tl.load(vbase + src + offs, mask=m)
    if FP8:
        meta = bh.to(tl.int64) * LC + p
        xk = xk.to(tl.float32) * tl.load(k_scale + meta, mask=ok, other=0.0)
        xv = xv.to(tl.float32) * tl.load(v_scale + meta, mask=ok, other=0.0)
    tl.store(dst_k + dst + offs, xk.to(dst_k.dtype.element_ty), mask=m)
    tl.store(dst_v + dst + offs, xv.to(dst_v.dtype.element_ty), mask=m)
    if blk == 0:
        ln = tl.load(src_len + bh * LC + p, mask=ok)
        tl.store(dst_len + bh * N + tl.maximum(slot, 0), ln, mask=ok)


def _chunks(t) -> list[torch.Tensor]:
    return list(t) if isinstance(t, (list, tuple)) else [t]


def _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, k_scale, v_scale):
    """Shapes and dtypes; returns (K chunks, V chunks, B, H, Cc, LC, N, S, D, K)."""
    kc, vc = _chunks(src_k), _chunks(src_v)
    if dst_k.dim() != 5:
        raise ValueError(f"the destination pool must be [B, H, N, S, D]; got {tuple(dst_k.shape)}")
    B, H, N, S, D = dst_k.shape
    if dst_v.shape != dst_k.shape:
        raise ValueError("K and V destination pools must have the same shape")
    if len(kc) != len(vc):
        raise ValueError(f"K and V have {len(kc)} and {len(vc)} chunks")
    Cc = kc[0].shape[2] if kc and kc[0].dim() == 5 else 0
    for t in kc + vc:
        if t.dim() != 5 or t.shape[:2] != (B, H) or t.shape[3:] != (S, D) or t.shape[2] != Cc:
            raise ValueError(f"every source chunk must be [B={B}, H={H}, Cc={Cc}, S={S}, D={D}]; got {tuple(t.shape)}")
        if t.dtype != kc[0].dtype:
            raise TypeError(f"source chunks differ in dtype: {t.dtype} vs {kc[0].dtype}")
    fp8 = bool(kc) and kc[0].dtype == torch.float8_e4m3fn
    if (k_scale is None) != (v_scale is None) or fp8 != (k_scale is not None):
        raise ValueError("fp8 source chunks need k_scale and v_scale (one float32 per page and head), and only they")
    if kc and not fp8 and kc[0].dtype != dst_k.dtype:
        raise TypeError(f"source and destination dtypes differ: {kc[0].dtype} vs {dst_k.dtype}")
    if ids.shape != slots.shape or ids.dim() != 3 or ids.shape[:2] != (B, H):
        raise ValueError(f"ids {tuple(ids.shape)} and slots {tuple(slots.shape)} must both be [B={B}, H={H}, K]")
    if src_len.dim() != 3 or src_len.shape[:2] != (B, H) or src_len.shape[2] < Cc * len(kc):
        raise ValueError(f"source lengths must be [B, H, C'] with C' >= {Cc * len(kc)} pages; got {tuple(src_len.shape)}")
    if dst_len.shape != (B, H, N):
        raise ValueError(f"destination lengths must be [B={B}, H={H}, N={N}]; got {tuple(dst_len.shape)}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and (s.shape != src_len.shape or s.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 {tuple(src_len.shape)} like the lengths; got {s.dtype} "
                             f"{tuple(s.shape)}")
    return kc, vc, B, H, Cc, src_len.shape[2], N, S, D, ids.shape[2]


def load_pages_reference(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, *, k_scale=None,
                         v_scale=None) -> None:
    """Torch definition: ``dst[b, h, slots[b, h, j]] = src[b, h, ids[b, h, j]]`` (times its scale, for fp8) where
    ``ids >= 0``. Arguments as for ``load_pages``."""
    kc, vc, B, H, Cc, LC, N, S, D, K = _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len,
                                              k_scale, v_scale)
    sd, dd = src_len.device, dst_k.device
    rows = torch.arange(B * H, device=ids.device).view(B, H, 1).expand(B, H, K).reshape(-1)
    ok = (ids >= 0).reshape(-1)
    page, row = ids.reshape(-1)[ok].to(sd), rows[ok].to(sd)
    dst = (rows[ok] * N + slots.reshape(-1)[ok]).to(dd)
    if not kc or page.numel() == 0:
        return
    chunk, local = page // Cc, page % Cc
    for chunks, scale, d in ((kc, k_scale, dst_k), (vc, v_scale, dst_v)):
        out = torch.empty((page.numel(), S * D), dtype=d.dtype, device=sd)
        for c in torch.unique(chunk).tolist():
            sel = (chunk == c).nonzero().squeeze(1)
            x = chunks[c].reshape(B * H * Cc, S * D).index_select(0, row[sel] * Cc + local[sel])
            if scale is not None:
                x = x.float() * scale.reshape(-1)[row[sel] * LC + page[sel]].unsqueeze(-1)
            out[sel] = x.to(d.dtype)
        d.view(B * H * N, S * D).index_copy_(0, dst, out.to(dd))
    dst_len.view(-1).index_copy_(0, dst, src_len.reshape(-1).index_select(0, row * LC + page).to(dd))


def chunk_table(chunks: Sequence[torch.Tensor], device) -> torch.Tensor:
    """``[len(chunks)]`` int64 addresses of ``chunks`` on ``device`` (what the kernel indexes). A host-to-device
    copy: keep it while the chunks live (``kvpolicy.pool.PagePool.chunk_tables`` does)."""
    return torch.tensor([c.data_ptr() for c in chunks], dtype=torch.int64).to(device)


def load_pages(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, *, k_scale=None, v_scale=None,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 1024) -> None:
    """Launch the page-load kernel on the current CUDA stream (asynchronous; no host synchronisation).

    src_k, src_v: one ``[B, H, C, S, D]`` tensor or a list of chunks ``[B, H, Cc, S, D]`` (pinned host or
    device), in the destination's dtype or float8_e4m3fn; src_len: ``[B, H, C']`` int32 with ``C'`` at least the
    pages held (same memory kind); k_scale, v_scale: ``[B, H, C']`` float32, for fp8 sources only; ids, slots:
    ``[B, H, K]`` int64 on the device; dst_k, dst_v: ``[B, H, N, S, D]`` device; dst_len: ``[B, H, N]`` int32.
    ``tables``: the chunks' address tables on the device (``chunk_table``), made here when not given (a copy).
    Page ids must be below the pages held and slots below N where ids >= 0 (not checked: checking would read
    back from the device).
    """
    kc, vc, B, H, Cc, LC, N, S, D, K = _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len,
                                              k_scale, v_scale)
    if dst_k.device.type != "cuda" or ids.device.type != "cuda" or slots.device.type != "cuda":
        raise ValueError("load_pages needs the destination pool, ids and slots on a CUDA device")
    named = [(f"src_k[{i}]", t) for i, t in enumerate(kc)] + [(f"src_v[{i}]", t) for i, t in enumerate(vc)]
    named += [("src_len", src_len), ("k_scale", k_scale), ("v_scale", v_scale)]
    for name, t in named:
        if t is None:
            continue
        if t.device.type == "cpu" and not t.is_pinned():
            raise ValueError(f"{name} is in pageable host memory; the GPU can only read pinned host memory")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if src_len.dtype != torch.int32 or dst_len.dtype != torch.int32:
        raise TypeError("page lengths must be int32")
    _launch(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, k_scale, v_scale, tables, block)


def _launch(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len, k_scale, v_scale, tables, block) -> None:
    """The launch itself (no device checks: the Triton interpreter runs it on CPU tensors in the tests)."""
    kc, vc, B, H, Cc, LC, N, S, D, K = _check(src_k, src_v, src_len, ids, slots, dst_k, dst_v, dst_len,
                                              k_scale, v_scale)
    if B * H * K == 0 or not kc:  # nothing to copy (with no chunk, every id must be < 0)
        return
    k_tbl, v_tbl = tables if tables is not None else (chunk_table(kc, dst_k.device), chunk_table(vc, dst_k.device))
    fp8 = k_scale is not None
    row = S * D
    blk = min(block, triton.next_power_of_2(row))
    grid = (B * H * K, triton.cdiv(row, blk))
    _load_pages_kernel[grid](
        k_tbl, v_tbl, kc[0], src_len, k_scale if fp8 else src_len, v_scale if fp8 else src_len,
        ids.contiguous(), slots.contiguous(), dst_k, dst_v, dst_len,
        K, Cc, LC, N, ROW=row, BLOCK=blk, FP8=fp8,
    )
