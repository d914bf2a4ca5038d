"""The attention of the captured dense baseline (``bench decode``'s ``dense+graphs``): split-K over a static cache.

A ``StaticCache`` hands every layer its whole buffer, ``[B, Hkv, Lmax, D]``, at every step, and SDPA then reads
all ``Lmax`` positions through a mask. Flash attention takes no mask, so the call goes to the memory-efficient
kernel, which splits a one-token query over batch and heads only: at 130k tokens and 8 KV heads it left most of
an H100 idle, and the captured dense step took 7x the eager one (issue 18's table).

Here a one-token query instead reads the buffer as pages of ``PAGE`` tokens through the library's own split-K
decode kernel (``kvpolicy.attention.decode_attention``: many programs per head, one log-sum-exp merge), with the
number of valid positions kept in a device tensor, so the step has fixed shapes and is captured whole. The
positions beyond the valid length are never attended (their page lengths are 0 or cut). Multi-token calls (the
prefill) and calls outside ``static_decode`` go to transformers' SDPA as before.

Use::

    register()                                  # once; then model.set_attn_implementation(NAME)
    with static_decode(valid):                  # valid: [1] int64 on the device, positions written so far
        model(tok, past_key_values=static_cache, cache_position=pos)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["NAME", "PAGE", "register", "static_decode", "static_decode_attention"]

NAME = "kvpolicy_static_decode"
PAGE = 16  # tokens per page of the split (the page size the decode kernel is tuned and tested for)

_state = threading.local()
_registered = False


def register() -> None:
    """Register the attention function and SDPA's mask function under ``NAME`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, static_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


@contextlib.contextmanager
def static_decode(valid: torch.Tensor) -> Iterator[None]:
    """One-token calls in this block attend to the first ``valid`` positions of the static buffers (``valid``:
    ``[1]`` int64 on the model's device, read on the device at every call: a captured step reads its update)."""
    if valid.dim() != 1 or valid.numel() != 1 or valid.dtype != torch.int64:
        raise ValueError(f"valid must be a [1] int64 tensor, got {tuple(valid.shape)} {valid.dtype}")
    prev, _state.valid = getattr(_state, "valid", None), valid
    try:
        yield
    finally:
        _state.valid = prev


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query ``[B, Hq, q_len, D]``, key/value ``[B, Hkv, Lmax, D]`` (the
    static buffers) -> ``([B, q_len, Hq, D], None)``."""
    valid = getattr(_state, "valid", None)
    if valid is None or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    from kvpolicy.attention import decode_attention

    B, Hq, _, D = query.shape
    H, L = key.shape[1], key.shape[2]
    P = L // PAGE
    n = valid.to(query.device)
    start = torch.arange(P, device=query.device) * PAGE  # [P] first position of each page
    page_len = (n - start).clamp(0, PAGE).to(torch.int32).expand(B, H, P)  # [B, Hkv, P] valid tokens per page
    slots = torch.arange(P, device=query.device).expand(B, H, P)  # [B, Hkv, P] every page, in order
    pages_k = key[:, :, : P * PAGE].view(B, H, P, PAGE, D)  # [B, Hkv, P, S, D] views, no copy
    pages_v = value[:, :, : P * PAGE].view(B, H, P, PAGE, D)
    tail_len = (n - P * PAGE).clamp(min=0)  # [1] valid positions of the tail (fewer than PAGE)
    none = key[:, :, :0]  # [B, Hkv, 0, D] no sink
    scale = scaling if scaling is not None else getattr(module, "scaling", D**-0.5)
    out = decode_attention(query[:, :, 0], none, none, pages_k, pages_v, page_len.contiguous(), slots.contiguous(),
                           key[:, :, P * PAGE :], value[:, :, P * PAGE :], scale, kwargs.get("softcap"),
                           win_len=tail_len)  # [B, Hq, D]
    return out[:, None], None
