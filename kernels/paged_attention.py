"""Sparse paged decode attention in Triton: [sink | selected pages | recent window], one float32 softmax.

Same arguments and result as the torch reference ``kvpolicy.attention.paged_decode_attention``, computed
split-K in two launches:

1. ``_split_kernel``, grid ``(B * Hkv, 1 + ceil(K / pages_per_split))``. Program ``(b, h, 0)`` attends to
   the sink and the window of KV head ``h``; program ``(b, h, s > 0)`` to the selected pages
   ``slots[b, h, (s-1)*pps : s*pps]``. The ``G = Hq // Hkv`` query heads of the GQA group are the rows of one
   ``[G_PAD, D]`` tile (``G_PAD`` = next power of two >= 16, for ``tl.dot``), so every KV page is read once
   per group. Slot ``-1`` and the tail of a page beyond ``slot_len`` are masked. Each program keeps an online
   softmax (running max ``m``, sum ``l``, accumulator ``acc``, base-2, float32) and writes it as a partial.
2. ``_reduce_kernel``, grid ``(B * Hq,)``: merges the partials of a row by log-sum-exp and writes the output
   in ``q``'s dtype.

Rows with nothing to attend to (no sink, no window, no valid selected token) come out as zeros; the torch
reference returns NaN there (a softmax over nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpolicy_kernels._checks import check_paged_attention_inputs, check_shape, interpreting

__all__ = ["choose_pages_per_split", "dot_config", "paged_decode_attention_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step. q: [G_PAD, BD]; k, v: [T, BD]; valid: [T]; m_i, l_i: [G_PAD]; acc: [G_PAD, BD]."""
    k = k.to(q.dtype)  # no-op except when bf16 is widened for the interpreter
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, T] fp32
    if HAS_SOFTCAP:
        x = s * qk_scale / softcap
        s = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)  # softcap * tanh(x), base 2
    else:
        s = s * qk_scale  # qk_scale already holds log2(e)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2() finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])  # [G_PAD, T]; masked tokens give exactly 0
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["H", "G", "Ts", "Tw", "K", "N", "NS", "PPS"])
def _split_kernel(
    q_ptr, sk_ptr, sv_ptr, pk_ptr, pv_ptr, plen_ptr, slots_ptr, wk_ptr, wv_ptr,
    wlen_ptr,  # WIN_FROM_PTR: [1] int, the window's valid tokens (<= Tw); read on the device
    part_ptr,  # fp32 partials of R = B*Hkv*NS*G rows: m [R], then l [R], then acc [R, D]
    H, G, D, S, Ts, Tw, K, N, NS, PPS,
    sq_b, sq_h,  # q: [B, Hq, D], last dim contiguous
    ss_b, ss_h, ss_t,  # sink_k and sink_v: [B, Hkv, Ts, D], one layout
    sp_b, sp_h, sp_n, sp_s,  # slot_k and slot_v: [B, Hkv, N, S, D], one layout
    sw_b, sw_h, sw_t,  # win_k and win_v: [B, Hkv, Tw, D], one layout
    qk_scale, softcap,
    G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_T: tl.constexpr, WIN_FROM_PTR: tl.constexpr,
):
    # slot_len: [B, Hkv, N] and slots: [B, Hkv, K] are contiguous
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    # q: [G_PAD, BLOCK_D], the GQA group of KV head h (rows >= G are zero and never stored)
    q = tl.load(q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(DOT_T)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    if split == 0:  # sink, then recent window: contiguous [T, D] runs of this KV head
        for t0 in range(0, Ts, BLOCK_T):
            t = t0 + offs_t
            ok = t < Ts
            msk = ok[:, None] & d_ok[None, :]
            off = b * ss_b + h * ss_h + t[:, None] * ss_t + offs_d[None, :]
            k = tl.load(sk_ptr + off, mask=msk, other=0.0)
            v = tl.load(sv_ptr + off, mask=msk, other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, ok, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, PRECISION)
        if WIN_FROM_PTR:  # a fixed-size window buffer whose valid length lives on the device (CUDA graphs)
            Tw = tl.minimum(tl.load(wlen_ptr).to(tl.int32), Tw)
        for t0 in range(0, Tw, BLOCK_T):
            t = t0 + offs_t
            ok = t < Tw
            msk = ok[:, None] & d_ok[None, :]
            off = b * sw_b + h * sw_h + t[:, None] * sw_t + offs_d[None, :]
            k = tl.load(wk_ptr + off, mask=msk, other=0.0)
            v = tl.load(wv_ptr + off, mask=msk, other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, ok, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, PRECISION)
    else:  # pages [first, first + PPS) of the selection, BLOCK_T tokens (BLOCK_T / BLOCK_S pages) at a time
        first = (split - 1).to(tl.int64) * PPS
        for i0 in range(0, PPS * BLOCK_S, BLOCK_T):
            flat = i0 + offs_t
            page = first + flat // BLOCK_S  # [T] position in slots[b, h, :]
            pos = flat % BLOCK_S  # [T] token within the page
            slot = tl.load(slots_ptr + bh * K + page, mask=page < K, other=-1).to(tl.int64)
            has = slot >= 0
            slot = tl.where(has, slot, 0)
            n_valid = tl.load(plen_ptr + bh * N + slot, mask=has, other=0)
            ok = has & (pos < n_valid) & (pos < S)
            msk = ok[:, None] & d_ok[None, :]
            off = b * sp_b + h * sp_h + slot[:, None] * sp_n + pos[:, None] * sp_s + offs_d[None, :]
            k = tl.load(pk_ptr + off, mask=msk, other=0.0)
            v = tl.load(pv_ptr + off, mask=msk, other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, ok, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, PRECISION)
    R = tl.num_programs(0).to(tl.int64) * NS * G
    row = (bh * NS + split) * G + offs_g  # [G_PAD] partial row of (b, h, split, g)
    tl.store(part_ptr + row, m_i, mask=g_ok)
    tl.store(part_ptr + R + row, l_i, mask=g_ok)
    tl.store(part_ptr + 2 * R + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["Hq", "G", "NS"])
def _reduce_kernel(
    part_ptr, out_ptr,
    Hq, G, D, NS,
    so_b, so_h, so_d,
    BLOCK_NS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # query row b * Hq + hq
    b = r // Hq
    hq = r % Hq
    bh = b * (Hq // G) + hq // G
    g = hq % G
    R = tl.num_programs(0).to(tl.int64) * NS  # B*Hq*NS = B*Hkv*NS*G partial rows
    offs_s = tl.arange(0, BLOCK_NS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # pass 1: the largest partial max of the row
    mx = tl.full([BLOCK_NS], float("-inf"), tl.float32)
    for s0 in range(0, NS, BLOCK_NS):
        s = s0 + offs_s
        mx = tl.maximum(mx, tl.load(part_ptr + (bh * NS + s) * G + g, mask=s < NS, other=float("-inf")))
    m_all = tl.max(mx, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    # pass 2: rescale every partial to that max and add up
    l_sum = tl.zeros([BLOCK_NS], tl.float32)
    o_sum = tl.zeros([BLOCK_NS, BLOCK_D], tl.float32)
    for s0 in range(0, NS, BLOCK_NS):
        s = s0 + offs_s
        ok = s < NS
        row = (bh * NS + s) * G + g
        w = tl.exp2(tl.load(part_ptr + row, mask=ok, other=float("-inf")) - m_safe)  # [BLOCK_NS]
        l_sum += w * tl.load(part_ptr + R + row, mask=ok, other=0.0)
        a = tl.load(part_ptr + 2 * R + row[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        o_sum += w[:, None] * a
    l_tot = tl.sum(l_sum, 0)
    o = tl.sum(o_sum, 0)
    o = tl.where(l_tot > 0, o / tl.where(l_tot > 0, l_tot, 1.0), 0.0)  # nothing valid: zeros
    tl.store(out_ptr + b * so_b + hq * so_h + offs_d * so_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def choose_pages_per_split(K: int, rows: int, page_size: int = 16) -> int:
    """Pages one split program reads: 4 to 16, fewer when ``rows = B * Hkv`` alone does not fill the GPU.

    Aims at about 512 page programs; the result is a power of two and covers at least one 64-token tile."""
    pps = 4
    while pps < 16 and rows * -(-K // pps) > 512:
        pps *= 2
    return max(pps, 64 // max(1, triton.next_power_of_2(page_size)))


def dot_config(dtype: torch.dtype) -> tuple[str, tl.dtype]:
    """(input_precision, operand dtype) of ``tl.dot`` for inputs of ``dtype``.

    float32 stays exact ("ieee", no TF32); fp16/bf16 run on tensor cores with float32 accumulation. Under the
    Triton interpreter bfloat16 operands are widened to float32 first: its ``tl.dot`` multiplies the raw bf16
    bit patterns (seen with triton 3.9)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return "ieee", tl.float32
    return "tf32", tl.float16 if dtype == torch.float16 else tl.bfloat16  # precision unused for 16-bit operands


def _storage(t: torch.Tensor) -> torch.Tensor:
    """A tensor Triton can take a pointer of: empty tensors become one element (never read)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dim (a copy only if it has none; used for q, sink and window)."""
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def paged_decode_attention_triton(
    q: torch.Tensor,  # [B, Hq, D] fp16/bf16/fp32, CUDA
    sink_k: torch.Tensor,  # [B, Hkv, Ts, D]
    sink_v: torch.Tensor,  # [B, Hkv, Ts, D]
    slot_k: torch.Tensor,  # [B, Hkv, N, S, D]  GPU slot pool
    slot_v: torch.Tensor,  # [B, Hkv, N, S, D]
    slot_len: torch.Tensor,  # [B, Hkv, N] int32/int64 valid tokens per slot (<= S)
    slots: torch.Tensor,  # [B, Hkv, K] int64/int32 slots to read, -1 = none
    win_k: torch.Tensor,  # [B, Hkv, Tw, D]
    win_v: torch.Tensor,  # [B, Hkv, Tw, D]
    scaling: float,
    softcap: float | None = None,
    *,
    out: torch.Tensor | None = None,  # [B, Hq, D] q.dtype; written in full
    pages_per_split: int | None = None,  # power of two; default ``choose_pages_per_split()``
    win_len: torch.Tensor | None = None,  # [1] int on q's device: valid window tokens (win_k holds Tw >= it)
) -> torch.Tensor:  # [B, Hq, D] q.dtype
    """Triton paged decode attention; the semantics of ``kvpolicy.attention.paged_decode_attention``.

    The slot pool is never copied: ``slot_k`` and ``slot_v`` must share one layout with a contiguous last
    dim (``PagePool`` tensors do); ``q``, sink and window may have any strides. Slot ids must be ``-1`` or
    below ``N`` and ``slot_len`` at most ``S`` (larger values read ``S`` tokens); neither is checked on the
    device (that would sync). A row with
    nothing valid to attend to returns zeros (the reference gives NaN). ``softcap`` (Gemma 2) applies
    ``softcap * tanh(logit / softcap)`` to the scaled logits; ``None`` or 0 turns it off.
    """
    B, Hq, H, D, Ts, N, S, K, Tw = check_paged_attention_inputs(
        q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v, softcap
    )
    G = Hq // H
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != q.dtype or out.device != q.device:
            raise TypeError(f"out must be a {q.dtype} tensor on {q.device}")
        check_shape("out", out, (B, Hq, D), "[B, Hq, D]")
    if out.numel() == 0:
        return out
    if pages_per_split is None:
        pps = choose_pages_per_split(K, B * H, S)
    else:
        pps = int(pages_per_split)
        if pps < 1 or pps & (pps - 1):  # with BLOCK_T a power of two, splits cover whole tiles
            raise ValueError(f"pages_per_split must be a power of two >= 1, got {pages_per_split}")
    BLOCK_S = triton.next_power_of_2(max(S, 1))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_T = 64 if BLOCK_D <= 128 else 32
    pps = max(pps, BLOCK_T // BLOCK_S)  # a split covers whole BLOCK_T tiles
    NS = 1 + triton.cdiv(K, pps)
    R = B * H * NS * G
    part = torch.empty(R * (D + 2), dtype=torch.float32, device=q.device)  # m, l, acc of every split
    has_softcap = bool(softcap)
    qk_scale = float(scaling) if has_softcap else float(scaling) * _LOG2E
    precision, dot_t = dot_config(q.dtype)
    q, sink_k, sink_v, win_k, win_v = (_rows(t) for t in (q, sink_k, sink_v, win_k, win_v))
    if sink_k.stride() != sink_v.stride():
        sink_k, sink_v = sink_k.contiguous(), sink_v.contiguous()
    if win_k.stride() != win_v.stride():
        win_k, win_v = win_k.contiguous(), win_v.contiguous()
    if slot_k.stride() != slot_v.stride() or (slot_k.numel() and slot_k.stride(-1) != 1):
        raise ValueError(
            f"slot_k and slot_v must share one layout with a contiguous last dim, got strides {slot_k.stride()} "
            f"and {slot_v.stride()}"
        )
    slots, slot_len = slots.contiguous(), slot_len.contiguous()
    if win_len is not None and (win_len.numel() != 1 or win_len.is_floating_point() or win_len.device != q.device):
        raise ValueError(f"win_len must be a 1-element integer tensor on {q.device}, got {tuple(win_len.shape)} "
                         f"{win_len.dtype} on {win_len.device}")
    _split_kernel[(B * H, NS)](
        q, _storage(sink_k), _storage(sink_v), _storage(slot_k), _storage(slot_v), _storage(slot_len),
        _storage(slots), _storage(win_k), _storage(win_v), win_len if win_len is not None else part, part,
        H, G, D, S, Ts, Tw, K, N, NS, pps,
        q.stride(0), q.stride(1),
        sink_k.stride(0), sink_k.stride(1), sink_k.stride(2),
        slot_k.stride(0), slot_k.stride(1), slot_k.stride(2), slot_k.stride(3),
        win_k.stride(0), win_k.stride(1), win_k.stride(2),
        qk_scale, float(softcap) if has_softcap else 1.0,
        G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T,
        HAS_SOFTCAP=has_softcap, PRECISION=precision, DOT_T=dot_t, WIN_FROM_PTR=win_len is not None,
        num_warps=4 if BLOCK_D <= 128 else 8,
    )
    _reduce_kernel[(B * Hq,)](part, out, Hq, G, D, NS, *out.stride(), BLOCK_NS=16, BLOCK_D=BLOCK_D, num_warps=4)
    return out
