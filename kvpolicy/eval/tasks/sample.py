"""One task prompt, ready for generation: :class:`TaskSample`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["TaskSample"]


@dataclass(frozen=True)
class TaskSample:
    """One task prompt, ready for generation.

    ``prompt_ids`` (T,) are the full model input with the chat template applied where used (feed them as
    is, without adding BOS again).  ``question_span`` is the half-open token range of the question, so a
    prefill-time eviction policy can be run with the question hidden; ``meta["context_span"]`` is the token
    range of the context (haystack / documents / word list).  Score a generation with :func:`score_sample`.
    """

    task: str
    id: str
    prompt_ids: list[int]  # (T,) token ids
    answers: list[str]  # expected strings (all must be recalled for "all"-scored tasks)
    context_tokens: int  # T = len(prompt_ids)
    target_tokens: int  # requested length (context_tokens <= target_tokens)
    depth: float | None  # needle depth in [0, 1] (niah/passkey; drawn from the seed when not given), else None
    max_new_tokens: int  # generation length the task needs
    question_span: tuple[int, int] | None  # [start, end) token positions of the question
    meta: dict[str, Any] = field(default_factory=dict)

    def input_ids(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The prompt as a (1, T) LongTensor, ready for ``model.generate(input_ids=...)``."""
        import torch

        return torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
