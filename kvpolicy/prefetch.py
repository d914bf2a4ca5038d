"""Selecting a layer's pages before its decode step (``KVPolicyCache(prefetch=...)``).

Two sources of the selection ahead of time, both ending in ``PolicyLayer.prefetch``:

* ``"follow"`` (exact): a layer that follows another (``Selector.follows_layer``: IceCache layer reuse,
  OmniKV) gets its pages from the followed layer's selection, so its pages are known, and can be loaded, as
  soon as that layer has selected. The step's result is unchanged.
* ``"estimate"`` (approximate; also does ``"follow"``): IceCache's next-layer query estimate
  (yuzhenmao/IceCache ``--n_prefetch_layers 1``, off by default there):

      q̃_{l+1} = RoPE(q_proj_{l+1}(x_l))     (and the layer's q_norm before RoPE where it has one)

  where x_l is layer l's attention input (normalised by layer l's own input norm). Layer l+1 then selects
  with q̃_{l+1} instead of its own query, and attends with its own query over those pages.

``NextQueryEstimator`` keeps the attention inputs of the decode step (a forward pre-hook on each attention
module that precedes an estimated layer) and computes q̃.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

__all__ = ["PREFETCH_MODES", "PREFETCH_SUFFIXES", "NextQueryEstimator", "check_prefetch_mode", "split_prefetch"]

PREFETCH_MODES = ("off", "follow", "estimate")
PREFETCH_SUFFIXES = {"+prefetch": "follow", "+estimate": "estimate"}  # policy-spec suffixes (bench, eval)


def check_prefetch_mode(mode: str) -> str:
    if mode not in PREFETCH_MODES:
        raise ValueError(f"unknown prefetch mode {mode!r}; choose one of {', '.join(PREFETCH_MODES)}")
    return mode


def split_prefetch(spec: str) -> tuple[str, str]:
    """``"icecache@cuda:uva+estimate"`` -> ``("icecache@cuda:uva", "estimate")``; no suffix: ``"off"``."""
    for suffix, mode in PREFETCH_SUFFIXES.items():
        if spec.endswith(suffix):
            rest = spec[: -len(suffix)]
            if any(rest.endswith(other) for other in PREFETCH_SUFFIXES):
                raise ValueError(f"policy {spec!r}: choose one of {', '.join(PREFETCH_SUFFIXES)}")
            return rest, mode
    return spec, "off"


def decoder_layers(model) -> Sequence:
    """The decoder layers of a transformers causal LM (each with ``self_attn``)."""
    get = getattr(model, "get_decoder", None)
    layers = getattr(get(), "layers", None) if get is not None else None
    if layers is None or not all(hasattr(x, "self_attn") for x in layers):
        raise ValueError(
            f"prefetch='estimate' needs the model's decoder layers (model.get_decoder().layers with self_attn); "
            f"{type(model).__name__} has none"
        )
    return layers


class NextQueryEstimator:
    """Estimates the query of layer ``l + 1`` from the attention input of layer ``l`` during decode steps.

    ``targets``: the layers to estimate (each ``l + 1`` with ``l`` a layer of the model). Hooks are registered
    on the attention modules of the layers before them and hold the cache weakly: they do nothing for another
    cache's forward, and remove themselves once the cache is gone (or on ``close``)."""

    def __init__(self, model, cache, targets: Sequence[int]):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb
        self.layers = decoder_layers(model)
        self.targets = sorted(t for t in targets if 0 < t < len(self.layers))
        self._inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        ref = weakref.ref(cache)
        self._hooks = []
        for t in self.targets:
            self._hooks.append(
                self.layers[t - 1].self_attn.register_forward_pre_hook(self._hook(ref, t - 1), with_kwargs=True)
            )

    def _hook(self, ref, layer: int):
        def keep_input(module, args, kwargs):
            cache = ref()
            if cache is None:
                self.close()
                return
            mine = kwargs.get("past_key_values", kwargs.get("cache"))
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            pos = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if mine is cache and hidden is not None and pos is not None and hidden.shape[1] == 1:
                self._inputs[layer] = (hidden, pos)  # hidden: [B, 1, hidden_size]; pos: (cos, sin) [B, 1, D]
            else:
                self._inputs.pop(layer, None)

        return keep_input

    def estimate(self, target: int) -> torch.Tensor | None:
        """q̃ of layer ``target`` ([B, Hq, D], RoPE applied) from this step's attention input of ``target - 1``,
        or None if that input was not seen at this step."""
        kept = self._inputs.pop(target - 1, None)
        if kept is None:
            return None
        hidden, (cos, sin) = kept
        attn = self.layers[target].self_attn
        B = hidden.shape[0]
        q = attn.q_proj(hidden).view(B, 1, -1, attn.head_dim)  # [B, 1, Hq, D]
        if getattr(attn, "q_norm", None) is not None:  # Qwen3, Gemma 3
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # [B, Hq, 1, D]
        q, _ = self._rope(q, q, cos, sin)
        return q[:, :, 0]

    def scaling(self, target: int) -> float:
        attn = self.layers[target].self_attn
        return float(getattr(attn, "scaling", attn.head_dim**-0.5))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._inputs.clear()
