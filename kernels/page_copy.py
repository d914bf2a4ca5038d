"""Page gather / scatter between page pools on one GPU, in Triton, with torch references.

``gather_pages(pool, ids)`` reads pages ``pool[b, h, ids[b, h, k]]`` into a dense ``[B, H, K, S, D]`` block
(``-1`` gives a zero page); ``scatter_pages(dst, slots, src)`` writes ``src[b, h, k]`` to
``dst[b, h, slots[b, h, k]]`` in place (``-1`` skips). One program copies ``BLOCK`` elements of one page;
any strides are accepted. Ids must be ``-1`` or below the pool's page count (not checked on the device).
Within a row, scatter slots other than ``-1`` should be distinct: which duplicate wins is unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpolicy_kernels._checks import check_device, check_int, check_rank, check_shape

__all__ = ["gather_pages", "gather_pages_ref", "scatter_pages", "scatter_pages_ref"]


@triton.jit(do_not_specialize=["H", "K"])
def _gather_kernel(
    src_ptr, ids_ptr, out_ptr,  # ids: [B, H, K] contiguous
    H, K, S, D,
    ss_b, ss_h, ss_c, ss_s, ss_d,
    so_b, so_h, so_k, so_s, so_d,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)  # (b, h, k) of the output page
    k = (r % K).to(tl.int64)
    b = (r // K // H).to(tl.int64)
    h = (r // K % H).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = offs // BLOCK_D
    d = offs % BLOCK_D
    ok = (s < S) & (d < D)
    page = tl.load(ids_ptr + r).to(tl.int64) + tl.zeros_like(offs)  # [BLOCK] (a vector: the interpreter
    # rejects a scalar & vector load mask)
    x = tl.load(src_ptr + b * ss_b + h * ss_h + tl.maximum(page, 0) * ss_c + s * ss_s + d * ss_d,
                mask=ok & (page >= 0), other=0.0)
    tl.store(out_ptr + b * so_b + h * so_h + k * so_k + s * so_s + d * so_d, x, mask=ok)


@triton.jit(do_not_specialize=["H", "K"])
def _scatter_kernel(
    src_ptr, slots_ptr, dst_ptr,  # slots: [B, H, K] contiguous
    H, K, S, D,
    ss_b, ss_h, ss_k, ss_s, ss_d,
    sd_b, sd_h, sd_n, sd_s, sd_d,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)  # (b, h, k) of the source page
    k = (r % K).to(tl.int64)
    b = (r // K // H).to(tl.int64)
    h = (r // K % H).to(tl.int64)
    slot = tl.load(slots_ptr + r).to(tl.int64)
    if slot >= 0:
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        s = offs // BLOCK_D
        d = offs % BLOCK_D
        ok = (s < S) & (d < D)
        x = tl.load(src_ptr + b * ss_b + h * ss_h + k * ss_k + s * ss_s + d * ss_d, mask=ok)
        tl.store(dst_ptr + b * sd_b + h * sd_h + slot * sd_n + s * sd_s + d * sd_d, x, mask=ok)


def _blocks(S: int, D: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_D, programs per page): up to 4096 elements of a [S, D] page per program."""
    BLOCK_D = triton.next_power_of_2(max(D, 1))
    total = triton.next_power_of_2(max(S, 1)) * BLOCK_D
    BLOCK = min(total, max(4096, BLOCK_D))
    return BLOCK, BLOCK_D, triton.cdiv(total, BLOCK)


def _check_pool(name: str, pool: torch.Tensor) -> None:
    check_rank(name, pool, 5, "[B, H, N, S, D]")


def gather_pages(
    pool: torch.Tensor,  # [B, H, C, S, D] any dtype
    ids: torch.Tensor,  # [B, H, K] int64/int32 page ids, -1 = none (zero page)
    *,
    out: torch.Tensor | None = None,  # [B, H, K, S, D] pool.dtype
) -> torch.Tensor:  # [B, H, K, S, D]
    """Gather pages of ``pool``: ``out[b, h, k] = pool[b, h, ids[b, h, k]]``, zeros where ``ids`` is -1."""
    _check_pool("pool", pool)
    check_rank("ids", ids, 3, "[B, H, K]")
    check_int("ids", ids)
    B, H, _, S, D = pool.shape
    K = ids.shape[2]
    check_shape("ids", ids, (B, H, K), "[B, H, K]")
    if out is None:
        out = torch.empty((B, H, K, S, D), dtype=pool.dtype, device=pool.device)
    else:
        check_rank("out", out, 5, "[B, H, K, S, D]")
        check_shape("out", out, (B, H, K, S, D), "[B, H, K, S, D]")
        if out.dtype != pool.dtype:
            raise TypeError(f"out must have the pool's dtype {pool.dtype}, got {out.dtype}")
    check_device("pool", pool, ids=ids, out=out)
    if out.numel() == 0:
        return out
    if pool.numel() == 0:  # nothing to read: every id must be -1
        return out.zero_()
    BLOCK, BLOCK_D, per_page = _blocks(S, D)
    _gather_kernel[(B * H * K, per_page)](
        pool, ids.contiguous(), out, H, K, S, D, *pool.stride(), *out.stride(), BLOCK=BLOCK, BLOCK_D=BLOCK_D,
    )
    return out


def scatter_pages(
    dst: torch.Tensor,  # [B, H, N, S, D] written in place
    slots: torch.Tensor,  # [B, H, K] int64/int32 destination slots, -1 = skip
    src: torch.Tensor,  # [B, H, K, S, D] dst.dtype
) -> torch.Tensor:  # dst
    """Scatter pages into ``dst``: ``dst[b, h, slots[b, h, k]] = src[b, h, k]`` where ``slots`` is not -1."""
    _check_pool("dst", dst)
    check_rank("slots", slots, 3, "[B, H, K]")
    check_int("slots", slots)
    check_rank("src", src, 5, "[B, H, K, S, D]")
    B, H, _, S, D = dst.shape
    K = slots.shape[2]
    check_shape("slots", slots, (B, H, K), "[B, H, K]")
    check_shape("src", src, (B, H, K, S, D), "[B, H, K, S, D]")
    if src.dtype != dst.dtype:
        raise TypeError(f"src must have dst's dtype {dst.dtype}, got {src.dtype}")
    check_device("dst", dst, slots=slots, src=src)
    if src.numel() == 0 or dst.numel() == 0:
        return dst
    BLOCK, BLOCK_D, per_page = _blocks(S, D)
    _scatter_kernel[(B * H * K, per_page)](
        src, slots.contiguous(), dst, H, K, S, D, *src.stride(), *dst.stride(), BLOCK=BLOCK, BLOCK_D=BLOCK_D,
    )
    return dst


# ---------------------------------------------------------------------------------------- torch references
def gather_pages_ref(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``gather_pages`` (``index_select`` over the flattened (b, h, page) axis)."""
    B, H, C, S, D = pool.shape
    K = ids.shape[2]
    ids = ids.to(pool.device).long()
    if K == 0 or C == 0:
        return pool.new_zeros((B, H, K, S, D))
    rows = torch.arange(B * H, device=pool.device).view(B, H, 1) * C
    flat = (rows + ids.clamp(min=0)).reshape(-1)  # [B*H*K]
    out = pool.reshape(B * H * C, S, D).index_select(0, flat).view(B, H, K, S, D)
    return out.masked_fill((ids < 0).view(B, H, K, 1, 1), 0)


def scatter_pages_ref(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``scatter_pages`` (``index_copy_`` over the flattened (b, h, slot) axis); in place."""
    B, H, N, S, D = dst.shape
    slots = slots.to(dst.device).long()
    keep = (slots >= 0).reshape(-1)  # [B*H*K]
    rows = torch.arange(B * H, device=dst.device).view(B, H, 1) * N
    flat = (rows + slots).reshape(-1)[keep]
    pages = src.reshape(-1, S, D)[keep]
    if dst.is_contiguous():
        dst.view(B * H * N, S, D).index_copy_(0, flat, pages)
    else:
        b, h, n = flat // (H * N), flat // N % H, flat % N
        dst[b, h, n] = pages
    return dst
