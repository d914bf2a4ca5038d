"""Sparse paged decode attention, torch reference: [sink | selected pages | recent window], one softmax.

This is the definition the Triton kernel in ``kernels/`` is tested against, and the path used on CPU.
``decode_attention`` picks one of the two per call (see its docstring).
"""

from __future__ import annotations

import os

import torch

from kvpolicy.ops import triton_available

__all__ = ["ATTENTION_ENV", "attention_backend", "decode_attention", "dense_decode_attention", "paged_decode_attention"]

ATTENTION_ENV = "KVPOLICY_ATTENTION"  # "torch" | "triton" | "auto" (default)


def _triton_available() -> bool:  # a module attribute, so tests can patch the answer
    return triton_available()


def attention_backend(q: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation ``decode_attention`` uses for a query on ``q.device``.

    ``KVPOLICY_ATTENTION=torch|triton`` forces one (read at every call); unset, empty or ``auto`` picks Triton
    for CUDA tensors when triton is installed, else the torch reference."""
    mode = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not _triton_available():
            raise RuntimeError(f"{ATTENTION_ENV}=triton but triton is not installed (pip install 'kvpolicy[gpu]')")
        return "triton"
    if mode != "auto":
        raise ValueError(f"{ATTENTION_ENV} must be 'torch', 'triton' or 'auto', got {mode!r}")
    return "triton" if q.is_cuda and _triton_available() else "torch"


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    sink_k: torch.Tensor,  # [B, Hkv, Ts, D]
    sink_v: torch.Tensor,  # [B, Hkv, Ts, D]
    slot_k: torch.Tensor,  # [B, Hkv, N, S, D]
    slot_v: torch.Tensor,  # [B, Hkv, N, S, D]
    slot_len: torch.Tensor,  # [B, Hkv, N] int32
    slots: torch.Tensor,  # [B, Hkv, K] int64, -1 = none
    win_k: torch.Tensor,  # [B, Hkv, Tw, D]
    win_v: torch.Tensor,  # [B, Hkv, Tw, D]
    scaling: float,
    softcap: float | None = None,
    win_len: torch.Tensor | None = None,  # [1] int: only the first win_len window tokens count (device-side)
) -> torch.Tensor:  # [B, Hq, D]
    """``paged_decode_attention`` through the Triton kernel (``kvpolicy_kernels.paged_attention``) on CUDA when triton
    is installed, else through the torch reference; ``KVPOLICY_ATTENTION`` overrides (``attention_backend``).

    The two agree up to float rounding, except on a row with nothing to attend to (no sink, no window and no
    valid selected token): Triton returns zeros there, the reference NaN."""
    args = (q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v, scaling, softcap)
    if attention_backend(q) == "triton":
        from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(*args, win_len=win_len)
    return paged_decode_attention(*args, win_len=win_len)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    sink_k: torch.Tensor,  # [B, Hkv, Ts, D]
    sink_v: torch.Tensor,  # [B, Hkv, Ts, D]
    slot_k: torch.Tensor,  # [B, Hkv, N, S, D]  GPU slot pool
    slot_v: torch.Tensor,  # [B, Hkv, N, S, D]
    slot_len: torch.Tensor,  # [B, Hkv, N] int32 valid tokens per slot
    slots: torch.Tensor,  # [B, Hkv, K] int64 slots to read, -1 = none
    win_k: torch.Tensor,  # [B, Hkv, Tw, D]
    win_v: torch.Tensor,  # [B, Hkv, Tw, D]
    scaling: float,
    softcap: float | None = None,
    win_len: torch.Tensor | None = None,  # [1] int: valid window tokens (default: all Tw)
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one query token per row over the sink, the selected pages and the window.

    The query heads of a GQA group (``G = Hq // Hkv``) read their KV head's pages. Invalid page slots and
    the tail of partly filled pages are masked; everything is combined in a single float32 softmax.
    """
    B, Hq, D = q.shape
    H, K = slots.shape[1], slots.shape[2]
    S = slot_k.shape[3]
    G = Hq // H
    N = slot_k.shape[2]
    sl = slots.clamp(min=0)
    rows = torch.arange(B * H, device=q.device).view(B, H, 1) * N
    flat = (rows + sl).reshape(-1)  # [B*H*K] flat slot index
    sel_k = slot_k.reshape(B * H * N, S, D).index_select(0, flat).view(B, H, K * S, D)  # [B, H, K*S, D]
    sel_v = slot_v.reshape(B * H * N, S, D).index_select(0, flat).view(B, H, K * S, D)
    lens = torch.where(slots >= 0, slot_len.reshape(-1).index_select(0, flat).view(B, H, K).long(), 0)
    sel_mask = (torch.arange(S, device=q.device).view(1, 1, 1, S) < lens.unsqueeze(-1)).reshape(B, H, K * S)
    keys = torch.cat([sink_k, sel_k, win_k], dim=2).float()  # [B, H, L, D]
    vals = torch.cat([sink_v, sel_v, win_v], dim=2).float()
    ones = lambda t: torch.ones(B, H, t.shape[2], dtype=torch.bool, device=q.device)  # noqa: E731
    win_mask = ones(win_k)
    if win_len is not None:  # a fixed-size window buffer: tokens at or past win_len do not count
        win_mask = win_mask & (torch.arange(win_k.shape[2], device=q.device) < win_len.to(q.device).reshape(()))
    mask = torch.cat([ones(sink_k), sel_mask, win_mask], dim=2)  # [B, H, L]
    qg = q.float().view(B, H, G, D)
    logits = torch.einsum("bhgd,bhld->bhgl", qg, keys) * scaling  # [B, H, G, L]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = logits.softmax(dim=-1)
    out = torch.einsum("bhgl,bhld->bhgd", p, vals)  # [B, H, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)


def dense_decode_attention(q, k, v, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Reference dense decode attention. q: [B, Hq, D]; k, v: [B, Hkv, T, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    H = k.shape[1]
    qg = q.float().view(B, H, Hq // H, D)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    out = torch.einsum("bhgt,bhtd->bhgd", logits.softmax(-1), v.float())
    return out.reshape(B, Hq, D).to(q.dtype)
