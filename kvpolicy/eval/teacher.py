"""Teacher forcing through a cache: given tokens go in one decode step each, and each step's next-token logits
come out. The perplexity of ``--fidelity``, the long-generation curves of ``--task longgen`` and the question of
the ``+qafter`` mode (read after the context was compressed) all decode this way, so pages written during
decoding go to the index and the pool exactly as in generation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from kvpolicy.cache_arg import cache_kwargs

__all__ = ["forced_logits"]


def forced_logits(model: Any, cache: Any, tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    """Feed ``tokens`` ``[1, n]`` through ``cache`` (any transformers cache holding the tokens before them), one
    single-token forward each; yield, after each, the logits of the next token ``[1, vocab]`` in float32."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be [1, n], got {tuple(tokens.shape)}")
    for t in range(tokens.shape[1]):
        with torch.inference_mode():
            out = model(tokens[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
        yield out.logits[:, -1].float()
