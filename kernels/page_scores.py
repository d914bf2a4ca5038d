"""Fused page scoring for exact and Quest-style selectors, in Triton, with torch references.

* ``exact_page_scores(q, pool_k, lengths)``: a page's score for a query head is the largest ``q . k`` over
  the page's valid tokens (``ExactIndex.page_scores`` over a GPU page pool); empty pages score ``-inf``.
* ``token_page_scores(q, keys, page_tok)``: the same maximum where pages list token ids into a token-ordered
  key store (the ``dci_tree`` index on the GPU): keys are read once, in place, through the page table.
* ``pool_page_scores(q, k_chunks, lengths)``: the same maximum read from a chunked CPU page pool in place
  (``kvpolicy.pool.PagePool``: pinned host chunks read through unified addressing, fp8 pages dequantised by
  their per-(page, head) scale), so an index whose pages are the pool's pages needs no key copy of its own.
* ``quest_page_scores(q, lo, hi)``: the upper bound of ``q . k`` over the page's key box,
  ``sum_d max(q_d lo_d, q_d hi_d)`` (``QuestSelector``); pages at or beyond ``num_pages`` score ``-inf``.

Scores are float32, unscaled (no softmax scaling), ``[B, Hq, C]``. Each program scores a block of pages of one
KV head for all ``G = Hq // Hkv`` query heads of its group, so each key is read once per group. The pages to
load come from the scores by ``kvpolicy.ops.topk_pages`` (top-k per query head, then the GQA merge).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpolicy_kernels._checks import (
    check_device,
    check_int,
    check_rank,
    check_same_float,
    check_shape,
    interpreting,
)

__all__ = [
    "exact_page_scores",
    "exact_page_scores_ref",
    "token_page_scores",
    "token_page_scores_ref",
    "pool_page_scores",
    "pool_page_scores_ref",
    "quest_page_scores",
    "quest_page_scores_ref",
]


@triton.jit(do_not_specialize=["H", "G", "C"])
def _exact_kernel(
    q_ptr, k_ptr, len_ptr, out_ptr, mask_ptr,  # lengths: [B, H, C]; INDIRECT: token ids [B, H, C, S]; mask [B, H, C]
    H, G, C, S, D,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_c, sk_s, sk_d,
    so_b, so_h, so_c,
    G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PAGES: tl.constexpr,
    PRECISION: tl.constexpr, DOT_T: tl.constexpr, INDIRECT: tl.constexpr, HAS_MASK: tl.constexpr,
):  # G_PAD: the group padded for tl.dot (>= 16); INDIRECT: exactly G (one head at a time)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    flat = tl.arange(0, PAGES * BLOCK_S)
    page = tl.program_id(1).to(tl.int64) * PAGES + flat // BLOCK_S  # [T]
    pos = flat % BLOCK_S
    offs_p = tl.program_id(1).to(tl.int64) * PAGES + tl.arange(0, PAGES)
    if INDIRECT:  # keys stored by token (stride sk_c), pages list their token ids (-1: empty place)
        live = (page < C) & (pos < S)
        if HAS_MASK:  # pages left out are never read (their keys may sit across PCIe) and score -inf
            live = live & (tl.load(mask_ptr + (b * H + h) * C + page, mask=page < C, other=0) != 0)
        tok = tl.load(len_ptr + ((b * H + h) * C + page) * S + pos, mask=live, other=-1)
        ok = tok >= 0
        row = tl.maximum(tok, 0).to(tl.int64)[:, None] * sk_c
        k = tl.load(k_ptr + b * sk_b + h * sk_h + row + offs_d[None, :] * sk_d,
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [T, BLOCK_D]
        # exact float32 products on the CUDA cores, one query head at a time: no padding of the group to the
        # 16 rows a tensor-core dot needs (G is small), and no fp32 dot emulation
        for g in tl.static_range(G_PAD):
            qg = tl.load(q_ptr + b * sq_b + (h * G + g) * sq_h + offs_d * sq_d, mask=d_ok, other=0.0)  # [BLOCK_D]
            sg = tl.where(ok, tl.sum(k * qg.to(tl.float32)[None, :], 1), float("-inf"))  # [T]
            best = tl.max(tl.reshape(sg, (PAGES, BLOCK_S)), 1)  # [PAGES]
            tl.store(out_ptr + b * so_b + (h * G + g) * so_h + offs_p * so_c, best, mask=offs_p < C)
    else:
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < G
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_T)  # [G_PAD, BLOCK_D]
        n_valid = tl.load(len_ptr + (b * H + h) * C + page, mask=page < C, other=0)
        ok = (pos < n_valid) & (pos < S)
        row = page[:, None] * sk_c + pos[:, None] * sk_s
        k = tl.load(k_ptr + b * sk_b + h * sk_h + row + offs_d[None, :] * sk_d,
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(DOT_T)  # [T, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, T]
        s = tl.where(ok[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(s, (G_PAD, PAGES, BLOCK_S)), 2)  # [G_PAD, PAGES]
        tl.store(out_ptr + b * so_b + (h * G + offs_g)[:, None] * so_h + offs_p[None, :] * so_c, best,
                 mask=g_ok[:, None] & (offs_p < C)[None, :])


@triton.jit(do_not_specialize=["H", "C", "CC", "LC"])
def _pool_kernel(
    q_ptr, k_off, k_ref, len_ptr, scale_ptr, mask_ptr, out_ptr,  # k_off: [n_chunks] int64 element offsets of
    #   the chunks from chunk 0 (k_ref): loads through k_ref keep its alignment, so they vectorise (ALIGN)
    H, C, CC, LC, S, D,  # len/mask: [B*H, C]; scale: [B*H, LC] float32 (FP8); chunks: [B*H*CC, S, D]
    sq_b, sq_h, sq_d,
    so_b, so_h, so_c,
    G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PAGES: tl.constexpr, FP8: tl.constexpr,
    HAS_MASK: tl.constexpr, ALIGN: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    flat = tl.arange(0, PAGES * BLOCK_S)
    page = tl.program_id(1).to(tl.int64) * PAGES + flat // BLOCK_S  # [T]
    pos = flat % BLOCK_S
    offs_p = tl.program_id(1).to(tl.int64) * PAGES + tl.arange(0, PAGES)
    live = page < C
    if HAS_MASK:  # pages left out are never read (they sit across PCIe) and score -inf
        live = live & (tl.load(mask_ptr + bh * C + page, mask=live, other=0) != 0)
    n = tl.load(len_ptr + bh * C + page, mask=live, other=0)  # pages are filled from slot 0
    ok = live & (pos < n) & (pos < S)
    chunk = page // CC
    delta = tl.load(k_off + chunk, mask=ok, other=0)  # [T] where each token's chunk starts, from chunk 0
    if ALIGN > 1:
        delta = tl.multiple_of(delta, ALIGN)
    row = delta + ((bh * CC + (page - chunk * CC)) * S + pos) * D
    k = tl.load(k_ref + row[:, None] + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)  # [T, BLOCK_D]
    if FP8:
        k = k * tl.load(scale_ptr + bh * LC + page, mask=ok, other=0.0)[:, None]
    for g in tl.static_range(G):  # exact float32 products, one query head at a time (as the INDIRECT path)
        qg = tl.load(q_ptr + b * sq_b + (h * G + g) * sq_h + offs_d * sq_d, mask=d_ok, other=0.0)
        sg = tl.where(ok, tl.sum(k * qg.to(tl.float32)[None, :], 1), float("-inf"))
        best = tl.max(tl.reshape(sg, (PAGES, BLOCK_S)), 1)  # [PAGES]
        tl.store(out_ptr + b * so_b + (h * G + g) * so_h + offs_p * so_c, best, mask=offs_p < C)


@triton.jit(do_not_specialize=["H", "G", "C"])
def _quest_kernel(
    q_ptr, lo_ptr, hi_ptr, np_ptr, out_ptr,  # num_pages: [B, H] contiguous
    H, G, C, D,
    sq_b, sq_h, sq_d,
    slo_b, slo_h, slo_c, slo_d,
    shi_b, shi_h, shi_c, shi_d,
    so_b, so_h, so_c,
    G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, HAS_NUM: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G_PAD, BLOCK_D]
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < C
    if HAS_NUM:
        p_ok = p_ok & (offs_p < tl.load(np_ptr + b * H + h))
    msk = p_ok[:, None] & d_ok[None, :]
    lo = tl.load(lo_ptr + b * slo_b + h * slo_h + offs_p[:, None] * slo_c + offs_d[None, :] * slo_d, mask=msk,
                 other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
    hi = tl.load(hi_ptr + b * shi_b + h * shi_h + offs_p[:, None] * shi_c + offs_d[None, :] * shi_d, mask=msk,
                 other=0.0).to(tl.float32)
    # max(q lo, q hi) = max(q, 0) hi + min(q, 0) lo for lo <= hi: two exact fp32 products
    s = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
    s += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")  # [G_PAD, BLOCK_P]
    s = tl.where(p_ok[None, :], s, float("-inf"))
    tl.store(out_ptr + b * so_b + (h * G + offs_g)[:, None] * so_h + offs_p[None, :] * so_c, s,
             mask=g_ok[:, None] & (offs_p < C)[None, :])


def _heads(q: torch.Tensor, H: int) -> int:
    Hq = q.shape[1]
    if H < 1 or Hq % H:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of the KV heads Hkv={H}")
    return Hq // H


def exact_page_scores(
    q: torch.Tensor,  # [B, Hq, D] q.dtype == pool_k.dtype
    pool_k: torch.Tensor,  # [B, Hkv, C, S, D] GPU page pool (keys)
    lengths: torch.Tensor,  # [B, Hkv, C] int32/int64 valid tokens per page (0 = empty)
) -> torch.Tensor:  # [B, Hq, C] float32, -inf for empty pages
    """Max ``q . k`` over each page's valid tokens, for every query head (no scaling)."""
    check_rank("q", q, 3, "[B, Hq, D]")
    check_rank("pool_k", pool_k, 5, "[B, Hkv, C, S, D]")
    check_rank("lengths", lengths, 3, "[B, Hkv, C]")
    check_same_float("q", q, pool_k=pool_k)
    check_int("lengths", lengths)
    B, Hq, D = q.shape
    H, C, S = pool_k.shape[1], pool_k.shape[2], pool_k.shape[3]
    G = _heads(q, H)
    check_shape("pool_k", pool_k, (B, H, C, S, D), "[B, Hkv, C, S, D]")
    check_shape("lengths", lengths, (B, H, C), "[B, Hkv, C]")
    check_device("q", q, pool_k=pool_k, lengths=lengths)
    out, done = _scores_out(B, Hq, C, S, D, q.device)
    if done:
        return out
    if q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting()):
        precision, dot_t = "ieee", tl.float32  # see kvpolicy_kernels.paged_attention.dot_config
    else:
        precision, dot_t = "tf32", tl.float16 if q.dtype == torch.float16 else tl.bfloat16
    _launch_exact(q, pool_k, lengths.contiguous(), out, H, G, C, S, D, pool_k.stride(), precision, dot_t, False)
    return out


def _scores_out(B: int, Hq: int, C: int, S: int, D: int, device) -> tuple[torch.Tensor, bool]:
    """The [B, Hq, C] float32 output, and whether it is already final (nothing to score: empty, or all -inf)."""
    out = torch.empty((B, Hq, C), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, True
    if S == 0 or D == 0:
        return out.fill_(float("-inf")), True
    return out, False


def _launch_exact(q, keys, pages, out, H, G, C, S, D, k_strides, precision, dot_t, indirect, mask=None) -> None:
    BLOCK_S = triton.next_power_of_2(S)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    PAGES = max(1, (64 if BLOCK_D <= 128 else 32) // BLOCK_S)
    _exact_kernel[(q.shape[0] * H, triton.cdiv(C, PAGES))](
        q, keys, pages, out, pages if mask is None else mask, H, G, C, S, D,
        *q.stride(), *k_strides, *out.stride(),
        G_PAD=G if indirect else max(16, triton.next_power_of_2(G)), BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S,
        PAGES=PAGES, PRECISION=precision, DOT_T=dot_t, INDIRECT=indirect, HAS_MASK=mask is not None, num_warps=4,
    )


def token_page_scores(
    q: torch.Tensor,  # [B, Hq, D] float32
    keys: torch.Tensor,  # [B, Hkv, T, D] token-ordered key store (any float dtype; device or pinned host memory)
    page_tok: torch.Tensor,  # [B, Hkv, C, S] int64 token ids of each page, -1 = empty place
    mask: torch.Tensor | None = None,  # [B, Hkv, C] bool: pages to score (None: all)
) -> torch.Tensor:  # [B, Hq, C] float32, -inf for empty pages and pages left out by the mask
    """Max ``q . k`` over each page's tokens, reading the keys through the page table (exact float32 products;
    no copy or conversion of the key store). The keys of pages left out by ``mask`` are never read, so a key
    store in pinned host memory (read by the GPU through unified addressing) costs PCIe traffic for the
    scored pages only."""
    check_rank("q", q, 3, "[B, Hq, D]")
    check_rank("keys", keys, 4, "[B, Hkv, T, D]")
    check_rank("page_tok", page_tok, 4, "[B, Hkv, C, S]")
    if q.dtype != torch.float32 or not keys.is_floating_point():
        raise TypeError(f"q must be float32 and keys floating, got {q.dtype} and {keys.dtype}")
    check_int("page_tok", page_tok)
    B, Hq, D = q.shape
    H, C, S = keys.shape[1], page_tok.shape[2], page_tok.shape[3]
    G = _heads(q, H)
    check_shape("keys", keys, (B, H, keys.shape[2], D), "[B, Hkv, T, D]")
    check_shape("page_tok", page_tok, (B, H, C, S), "[B, Hkv, C, S]")
    if mask is not None:
        check_rank("mask", mask, 3, "[B, Hkv, C]")
        check_shape("mask", mask, (B, H, C), "[B, Hkv, C]")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        check_device("q", q, mask=mask)
    if keys.device != q.device and not (keys.device.type == "cpu" and keys.is_pinned()):
        raise ValueError(f"keys must be on {q.device} or in pinned host memory, got {keys.device} (pageable)")
    check_device("q", q, page_tok=page_tok)
    out, done = _scores_out(B, Hq, C, S, D, q.device)
    if done:
        return out
    ks = keys.stride()
    _launch_exact(q, keys, page_tok.contiguous(), out, H, G, C, S, D, (ks[0], ks[1], ks[2], 0, ks[3]), "ieee",
                  tl.float32, True, None if mask is None else mask.contiguous().view(torch.uint8))
    return out


def pool_page_scores(
    q: torch.Tensor,  # [B, Hq, D] float32
    k_chunks: list[torch.Tensor],  # chunks [B, Hkv, Cc, S, D] of a page pool's K (pinned host or device memory)
    lengths: torch.Tensor,  # [B, Hkv, C] int32/int64 valid tokens per page (filled from slot 0); C may exceed
    #                         the pages the chunks hold where those pages are empty (length 0)
    *,
    k_scale: torch.Tensor | None = None,  # [B, Hkv, LC] float32 per-(page, head) scales of fp8 chunks (LC >= C')
    mask: torch.Tensor | None = None,  # [B, Hkv, C] bool: pages to score (None: all)
    offsets: torch.Tensor | None = None,  # [n_chunks] int64 element offsets of the chunks from chunk 0, on q's
    #                                       device (PagePool.chunk_offsets)
) -> torch.Tensor:  # [B, Hq, C] float32, -inf for empty pages and pages left out by the mask
    """Max ``q . k`` over each page's valid tokens, the keys read in place from the chunks of a page pool (page
    ``p`` in chunk ``p // Cc`` at ``p % Cc``; fp8 keys times their page's scale), exact float32 products. Only the
    pages that ``mask`` keeps are read, so a pinned host pool costs PCIe traffic for the scored pages only.
    ``offsets`` is made here when not given (a host-to-device copy: pass the pool's cached one on the hot path).
    The kernel addresses every chunk from chunk 0's pointer, so its loads keep that pointer's alignment and
    vectorise (an address loaded from a table carries no alignment: 2-byte loads, slow across PCIe)."""
    check_rank("q", q, 3, "[B, Hq, D]")
    check_rank("lengths", lengths, 3, "[B, Hkv, C]")
    if q.dtype != torch.float32:
        raise TypeError(f"q must be float32, got {q.dtype}")
    check_int("lengths", lengths)
    if not k_chunks:
        raise ValueError("k_chunks must hold at least one chunk [B, Hkv, Cc, S, D]")
    B, Hq, D = q.shape
    H, C = lengths.shape[1], lengths.shape[2]
    G = _heads(q, H)
    ref = k_chunks[0]
    check_rank("k_chunks[0]", ref, 5, "[B, Hkv, Cc, S, D]")
    Cc, S = ref.shape[2], ref.shape[3]
    check_shape("lengths", lengths, (B, H, C), "[B, Hkv, C]")
    fp8 = ref.dtype == torch.float8_e4m3fn
    if not (ref.is_floating_point() or fp8):
        raise TypeError(f"k_chunks must be floating (or float8_e4m3fn), got {ref.dtype}")
    for i, c in enumerate(k_chunks):
        check_shape(f"k_chunks[{i}]", c, (B, H, Cc, S, D), "[B, Hkv, Cc, S, D]")
        if c.dtype != ref.dtype or not c.is_contiguous():
            raise ValueError(f"k_chunks[{i}] must be contiguous with the dtype of chunk 0 ({ref.dtype})")
        if c.device != q.device and not (c.device.type == "cpu" and c.is_pinned()) and not interpreting():
            raise ValueError(f"k_chunks[{i}] must be on {q.device} or in pinned host memory, got {c.device}")
    if fp8:
        if k_scale is not None and k_scale.device != q.device and not k_scale.is_pinned() and not interpreting():
            raise ValueError(f"k_scale must be on {q.device} or in pinned host memory, got {k_scale.device}")
        if k_scale is None:
            raise ValueError("fp8 chunks need k_scale [B, Hkv, LC] (one float32 scale per page and head)")
        check_rank("k_scale", k_scale, 3, "[B, Hkv, LC]")
        if k_scale.dtype != torch.float32 or k_scale.shape[:2] != (B, H) or k_scale.shape[2] < min(C, len(k_chunks) * Cc):
            raise ValueError(f"k_scale must be float32 [B={B}, Hkv={H}, LC >= pages], got {k_scale.dtype} "
                             f"{tuple(k_scale.shape)}")
    if mask is not None:
        check_rank("mask", mask, 3, "[B, Hkv, C]")
        check_shape("mask", mask, (B, H, C), "[B, Hkv, C]")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        check_device("q", q, mask=mask)
    check_device("q", q, lengths=lengths)
    out, done = _scores_out(B, Hq, C, S, D, q.device)
    if done:
        return out
    size = ref.element_size()
    if offsets is None:
        offsets = torch.tensor([(c.data_ptr() - ref.data_ptr()) // size for c in k_chunks], dtype=torch.int64)
        offsets = offsets.to(q.device)
    vec = 16 // size  # elements per 16-byte load, if every chunk start and row is 16-byte aligned
    align = vec if all((c.data_ptr() % 16) == 0 for c in k_chunks) and (D * size) % 16 == 0 else 1
    scale = k_scale if fp8 else out  # placeholder pointer, never read
    LC = k_scale.shape[2] if fp8 else 0
    BLOCK_S = triton.next_power_of_2(S)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    PAGES = max(1, (64 if BLOCK_D <= 128 else 32) // BLOCK_S)
    _pool_kernel[(B * H, triton.cdiv(C, PAGES))](
        q, offsets, ref, lengths.contiguous(), scale,
        lengths if mask is None else mask.contiguous().view(torch.uint8), out, H, C, Cc, LC, S, D,
        *q.stride(), *out.stride(),
        G=G, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, PAGES=PAGES, FP8=fp8, HAS_MASK=mask is not None, ALIGN=align,
        num_warps=4,
    )
    return out


def quest_page_scores(
    q: torch.Tensor,  # [B, Hq, D] float
    lo: torch.Tensor,  # [B, Hkv, C, D] float: per-page elementwise key minimum
    hi: torch.Tensor,  # [B, Hkv, C, D] float: per-page elementwise key maximum (lo <= hi)
    num_pages: torch.Tensor | None = None,  # [B, Hkv] int: pages >= num_pages[b, h] score -inf
) -> torch.Tensor:  # [B, Hq, C] float32
    """Quest's page bound ``sum_d max(q_d lo_d, q_d hi_d)`` for every query head, in float32."""
    check_rank("q", q, 3, "[B, Hq, D]")
    check_rank("lo", lo, 4, "[B, Hkv, C, D]")
    check_rank("hi", hi, 4, "[B, Hkv, C, D]")
    for name, t in (("q", q), ("lo", lo), ("hi", hi)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    B, Hq, D = q.shape
    H, C = lo.shape[1], lo.shape[2]
    G = _heads(q, H)
    check_shape("lo", lo, (B, H, C, D), "[B, Hkv, C, D]")
    check_shape("hi", hi, (B, H, C, D), "[B, Hkv, C, D]")
    extra = {}
    if num_pages is not None:
        check_rank("num_pages", num_pages, 2, "[B, Hkv]")
        check_int("num_pages", num_pages)
        check_shape("num_pages", num_pages, (B, H), "[B, Hkv]")
        extra["num_pages"] = num_pages
    check_device("q", q, lo=lo, hi=hi, **extra)
    out = torch.empty((B, Hq, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if D == 0:
        return out.copy_(quest_page_scores_ref(q, lo, hi, num_pages))
    npg = num_pages.contiguous() if num_pages is not None else out  # placeholder pointer, never read
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_P = 64 if BLOCK_D <= 128 else 32
    _quest_kernel[(B * H, triton.cdiv(C, BLOCK_P))](
        q, lo, hi, npg, out, H, G, C, D,
        *q.stride(), *lo.stride(), *hi.stride(), *out.stride(),
        G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P,
        HAS_NUM=num_pages is not None, num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------- torch references
def exact_page_scores_ref(q: torch.Tensor, pool_k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Torch reference of ``exact_page_scores`` (float32 einsum, tail masked, max over the page)."""
    B, Hq, D = q.shape
    _, H, C, S, _ = pool_k.shape
    qg = q.float().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhcsd->bhgcs", qg, pool_k.float())  # [B, H, G, C, S]
    valid = torch.arange(S, device=q.device) < lengths.to(q.device).unsqueeze(-1)  # [B, H, C, S]
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    if S == 0:
        return torch.full((B, Hq, C), float("-inf"), device=q.device)
    return s.amax(-1).reshape(B, Hq, C)


def token_page_scores_ref(
    q: torch.Tensor, keys: torch.Tensor, page_tok: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of ``token_page_scores`` (float32 products of every token, max over each page's tokens,
    -inf where ``mask`` leaves a page out)."""
    B, Hq, D = q.shape
    H, C, S = keys.shape[1], page_tok.shape[2], page_tok.shape[3]
    qg = q.float().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, keys.to(q.device).float())  # [B, H, G, T]
    idx = page_tok.clamp(min=0).reshape(B, H, 1, C * S).expand(B, H, Hq // H, C * S)
    per = s.gather(-1, idx).view(B, H, Hq // H, C, S).masked_fill((page_tok < 0).unsqueeze(2), float("-inf"))
    if S == 0:
        return torch.full((B, Hq, C), float("-inf"), device=q.device)
    out = per.amax(-1)  # [B, H, G, C]
    if mask is not None:
        out = out.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return out.reshape(B, Hq, C)


def pool_page_scores_ref(
    q: torch.Tensor, k_chunks: list[torch.Tensor], lengths: torch.Tensor, *, k_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of ``pool_page_scores``: the chunks joined and dequantised, then ``exact_page_scores_ref``
    over the first ``C`` pages (pages past the chunks are empty)."""
    C = lengths.shape[2]
    k = torch.cat([c.to(q.device) for c in k_chunks], 2).float()  # [B, H, cap, S, D]
    if k_scale is not None and k_chunks[0].dtype == torch.float8_e4m3fn:
        k = k * k_scale[:, :, : k.shape[2]].to(q.device)[..., None, None]
    if k.shape[2] < C:
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, C - k.shape[2]))
    out = exact_page_scores_ref(q.float(), k[:, :, :C], lengths)  # [B, Hq, C]
    if mask is not None:
        B, Hq, _ = q.shape
        H = lengths.shape[1]
        out = out.view(B, H, Hq // H, C).masked_fill(~mask.to(q.device).unsqueeze(2), float("-inf")).view(B, Hq, C)
    return out


def quest_page_scores_ref(
    q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_pages: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of ``quest_page_scores`` (the ``box_upper_bound`` of the Quest selector)."""
    B, Hq, D = q.shape
    H, C = lo.shape[1], lo.shape[2]
    qg = q.float().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhcd->bhgc", qg.clamp(min=0), hi.float())
    s = s + torch.einsum("bhgd,bhcd->bhgc", qg.clamp(max=0), lo.float())  # [B, H, G, C]
    if num_pages is not None:
        valid = torch.arange(C, device=q.device) < num_pages.to(q.device).unsqueeze(-1)  # [B, H, C]
        s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    return s.reshape(B, Hq, C)
