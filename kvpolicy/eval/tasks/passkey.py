"""``passkey``: delegates to :func:`kvpolicy.eval.passkey.make_passkey_sample` and adds the spans and metadata
of the other tasks."""

from __future__ import annotations

from typing import Any

from kvpolicy.eval.passkey import (
    BASE_ANSWER_PREFIX as PASSKEY_ANSWER_PREFIX,
)
from kvpolicy.eval.passkey import (
    INSTRUCTION as PASSKEY_INSTRUCTION,
)
from kvpolicy.eval.passkey import (
    QUESTION as PASSKEY_QUESTION,
)
from kvpolicy.eval.passkey import make_passkey_sample
from kvpolicy.eval.tasks.names import MAX_NEW_TOKENS, SCORERS
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _rng
from kvpolicy.eval.text import token_span, tokenize


def _make_passkey(
    task: str, tokenizer: Any, target: int, seed: int, depth: float | None, chat: bool, sample_id: str
) -> TaskSample:
    if depth is None:
        depth = _rng("passkey", seed, "depth").random()
    s = make_passkey_sample(
        tokenizer,
        context_tokens=target,
        depth=depth,
        seed=seed,
        use_chat_template=chat,
        answer_prefix=PASSKEY_ANSWER_PREFIX,
    )
    ids, offsets = tokenize(tokenizer, s.prompt, not s.chat_template)
    if ids != s.prompt_ids:  # cannot happen with a deterministic tokenizer; fall back to prefix counting
        offsets = None
    c0 = s.prompt.find(PASSKEY_INSTRUCTION) + len(PASSKEY_INSTRUCTION) + 2  # after "\n\n"
    q0 = s.prompt.rfind(PASSKEY_QUESTION)

    def span(a: int, b: int) -> tuple[int, int]:
        return token_span(tokenizer, s.prompt, not s.chat_template, offsets, a, b)

    return TaskSample(
        task="passkey",
        id=sample_id,
        prompt_ids=s.prompt_ids,
        answers=[s.passkey],
        context_tokens=s.context_tokens,
        target_tokens=target,
        depth=depth,
        max_new_tokens=MAX_NEW_TOKENS["passkey"],
        question_span=span(q0, q0 + len(PASSKEY_QUESTION)),
        meta={
            "scorer": SCORERS["passkey"],
            "chat_template": s.chat_template,
            "context_span": span(c0, q0 - 2),
            "needle_spans": [s.needle_token_span],
            "needle_depths": [s.needle_depth],
        },
    )
