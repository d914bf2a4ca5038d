"""``streaming_llm``: StreamingLLM (Xiao et al., ICLR 2024) under its own name: the core ``streaming`` selector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvpolicy.reference.streaming_selector import StreamingSelector

__all__ = ["StreamingLLMSelector"]


@dataclass(kw_only=True)
class StreamingLLMSelector(StreamingSelector):
    """An alias of ``streaming`` (attention sinks plus the most recent tokens). Preset ``streaming_llm`` uses
    the paper's 4 sink tokens and single-token pages, so the recent span is exactly ``budget - 4`` tokens."""

    name: ClassVar[str] = "streaming_llm"
