"""Capture the post-RoPE queries, keys and values of every attention layer during one dense forward.

A temporary attention function is registered with transformers (``AttentionInterface``); it records what each
layer's attention receives and then runs SDPA, so the forward is the model's own. The model's attention
implementation is restored afterwards, also on error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LayerQKV", "capture_qkv"]

_NAME = "kvpolicy_capture"


@dataclass(frozen=True)
class LayerQKV:
    """One layer's attention inputs (RoPE applied) and its softmax scale."""

    q: torch.Tensor  # [B, Hq, T, D]
    k: torch.Tensor  # [B, Hkv, T, D]
    v: torch.Tensor  # [B, Hkv, T, D]
    scaling: float
    sliding: bool  # a sliding-window layer (Gemma 3): not offloaded by kvpolicy


@torch.inference_mode()
def capture_qkv(model: Any, input_ids: torch.Tensor, layers: list[int] | None = None) -> dict[int, LayerQKV]:
    """Run ``model`` on ``input_ids`` ``[B, T]`` once and return ``{layer: LayerQKV}`` (``layers``: all if None)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    out: dict[int, LayerQKV] = {}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i = getattr(module, "layer_idx", len(out))
        if layers is None or i in layers:
            scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
            sliding = getattr(module, "sliding_window", None) is not None
            out[i] = LayerQKV(query.detach().clone(), key.detach().clone(), value.detach().clone(), float(scale),
                              sliding)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    AttentionInterface.register(_NAME, record)
    AttentionMaskInterface.register(_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        model(input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return out
