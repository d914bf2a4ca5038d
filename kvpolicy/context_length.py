"""The model's context length, checked before any model work: prompt + new tokens beyond the model's maximum
position is an error naming both numbers, unless the caller allows the overflow explicitly."""

from __future__ import annotations

from typing import Any

__all__ = ["ContextLengthError", "check_context_length", "max_positions"]


class ContextLengthError(ValueError):
    """Prompt + new tokens exceed the model's maximum position."""


def max_positions(config: Any) -> int | None:
    """The model's ``max_position_embeddings`` (of its text config), or ``None`` when it does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context_length(config: Any, prompt_tokens: int, new_tokens: int = 0, *, allow_overflow: bool = False,
                         what: str = "the prompt", hint: str = "allow_overflow=True") -> None:
    """Raise ``ContextLengthError`` when ``prompt_tokens + new_tokens`` exceeds the model's maximum position."""
    limit = max_positions(config)
    if allow_overflow or limit is None or prompt_tokens + new_tokens <= limit:
        return
    raise ContextLengthError(
        f"{what} ({prompt_tokens} tokens) plus {new_tokens} new tokens is {prompt_tokens + new_tokens} tokens, beyond "
        f"the model's context of {limit} tokens; shorten it or pass {hint}"
    )
