"""The task registry: :data:`GENERATORS` maps each task name to its generator, and :func:`make_sample` builds
one sample of a task after checking the arguments."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

from kvpolicy.errors import suggest
from kvpolicy.eval.tasks.common_words import _make_cwe
from kvpolicy.eval.tasks.frequent_words import _make_fwe
from kvpolicy.eval.tasks.names import DEPTH_TASKS, TASKS
from kvpolicy.eval.tasks.niah import _NIAH, _make_niah
from kvpolicy.eval.tasks.passkey import _make_passkey
from kvpolicy.eval.tasks.prompt import _use_chat
from kvpolicy.eval.tasks.qa import _make_qa
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.variable_tracking import _make_vt

__all__ = ["GENERATORS", "make_sample"]

# (task, tokenizer, target tokens, seed, depth or None, chat template?, sample id) -> TaskSample; ``depth`` is
# None for the tasks outside DEPTH_TASKS (make_sample rejects one)
Generator = Callable[[str, Any, int, int, float | None, bool, str], TaskSample]
GENERATORS: dict[str, Generator] = {
    "passkey": _make_passkey,
    **dict.fromkeys(_NIAH, _make_niah),
    "vt": _make_vt,
    "cwe": _make_cwe,
    "fwe": _make_fwe,
    "qa_squad": _make_qa,
    "qa_hotpot": _make_qa,
}
if tuple(GENERATORS) != TASKS:  # pragma: no cover - a task added to one list and not the other
    raise RuntimeError(f"task generators {tuple(GENERATORS)} do not match TASKS {TASKS}")


def make_sample(
    task: str,
    tokenizer: Any,
    target_tokens: int,
    *,
    seed: int,
    depth: float | None = None,
    use_chat_template: bool | None = None,
) -> TaskSample:
    """Build one sample of ``task`` with at most ``target_tokens`` tokens (template tokens included).

    The result is short of the target by less than about one haystack unit (a sentence, a list item, a
    document).  ``depth`` in [0, 1] places the (first queried) needle of niah/passkey tasks at the nearest
    sentence boundary (0: start of the context, 1: its end); None draws it from ``seed``; other tasks
    take no depth.  ``use_chat_template`` None means "if the tokenizer has one".  Deterministic for given
    arguments and tokenizer; keys, values and answers depend only on (task, seed), not on the length.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}.{suggest(task, TASKS)} Known tasks: {', '.join(TASKS)}")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int):
        raise TypeError(f"target_tokens must be an int, not {type(target_tokens).__name__}")
    if target_tokens < 1:
        raise ValueError(f"target_tokens must be positive, got {target_tokens}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if depth is not None:
        if task not in DEPTH_TASKS:
            raise ValueError(f"task {task!r} has no needle depth; depth applies to {', '.join(DEPTH_TASKS)}")
        if isinstance(depth, bool) or not isinstance(depth, Real):
            raise TypeError(f"depth must be a number in [0, 1] or None, not {type(depth).__name__}")
        depth = float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    chat = _use_chat(tokenizer, use_chat_template)
    sample_id = f"{task}-{target_tokens}-s{seed}" + (f"-d{depth:g}" if depth is not None else "")
    return GENERATORS[task](task, tokenizer, target_tokens, seed, depth, chat, sample_id)
