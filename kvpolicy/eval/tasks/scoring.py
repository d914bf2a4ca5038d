"""Scorers: RULER's "string match all" and "string match part", by task name or by sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvpolicy.errors import suggest
from kvpolicy.eval.tasks.names import SCORERS
from kvpolicy.eval.tasks.sample import TaskSample

__all__ = ["score", "score_all", "score_part", "score_sample"]


def _check_answers(prediction: str, answers: Sequence[str]) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, not {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of strings, not {type(answers).__name__}")
    if not answers:
        raise ValueError("answers is empty: nothing to score against")
    for a in answers:
        if not isinstance(a, str) or not a:
            raise ValueError(f"every answer must be a non-empty string, got {a!r}")


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER "string match all": the fraction of ``answers`` found (case-insensitively) in ``prediction``."""
    _check_answers(prediction, answers)
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def score_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER "string match part": 1.0 if any of ``answers`` is found (case-insensitively), else 0.0."""
    _check_answers(prediction, answers)
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


_SCORE_FNS: dict[str, Callable[[str, Sequence[str]], float]] = {"all": score_all, "part": score_part}


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """Score ``prediction`` against ``answers`` with the task's scorer (:data:`SCORERS`), in [0, 1]."""
    kind = SCORERS.get(task)
    if kind is None:
        raise ValueError(f"unknown task {task!r}.{suggest(task, SCORERS)} Known tasks: {', '.join(SCORERS)}")
    return _SCORE_FNS[kind](prediction, answers)


def score_sample(sample: TaskSample, prediction: str) -> float:
    """Score a generation for ``sample`` (uses ``sample.meta["scorer"]``, so custom task names work)."""
    kind = sample.meta.get("scorer") or SCORERS.get(sample.task)
    if kind not in _SCORE_FNS:
        raise ValueError(f"sample {sample.id!r} has no known scorer (meta['scorer']={kind!r})")
    return _SCORE_FNS[kind](prediction, sample.answers)
