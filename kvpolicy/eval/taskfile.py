"""Bring-your-own-data long-context QA: a JSONL file of {"id", "context", "question", "answers"} records.

One JSON object per line::

    {"id": "doc-1", "context": "<long text>", "question": "Who ...?", "answers": ["Ada Lovelace", "Lovelace"]}

``id`` is optional (default ``"line-N"``, N the 1-based line number) and must be unique; ``answers`` lists
the accepted answers (a prediction scores 1.0 when it contains any of them, case-insensitively: RULER's
"string match part").  Other keys are kept in the record.  :func:`read_task_file` reports every malformed
line with its line number and skips it; blank lines are ignored.  The context is used as is (no length
fitting): ``make_file_sample(...).context_tokens`` is whatever it tokenizes to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpolicy.eval.tasks.prompt import _assemble, _Built, _Context, _make_frame, _use_chat
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.text import tokenize

__all__ = ["FILE_INSTRUCTION", "FILE_ANSWER_PREFIX", "TaskFileProblem", "make_file_sample", "read_task_file"]

FILE_INSTRUCTION = "Answer the question based on the text below. Reply with the answer only, without any other words."
FILE_ANSWER_PREFIX = "Answer:"


@dataclass(frozen=True)
class TaskFileProblem:
    """A line of a task file that was skipped, and why."""

    line: int  # 1-based line number
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_record(obj: Any) -> str | None:
    """Why ``obj`` is not a valid record (ignoring ``id`` uniqueness), or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for name in ("context", "question"):
        if name not in obj:
            return f"missing {name!r}"
        if not isinstance(obj[name], str):
            return f"{name!r} must be a string, got {type(obj[name]).__name__}"
        if not obj[name].strip():
            return f"{name!r} is empty"
    if "answers" not in obj:
        return "missing 'answers'"
    answers = obj["answers"]
    if not isinstance(answers, list) or not answers:
        return f"'answers' must be a non-empty list of strings, got {_short(answers)}"
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            return f"'answers' must be a non-empty list of non-empty strings; item {i} is {_short(a)}"
    if "id" in obj and obj["id"] is not None:
        rid = obj["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
            return f"'id' must be a non-empty string or an integer, got {_short(rid)}"
    return None


def read_task_file(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[TaskFileProblem]]:
    """Read a JSONL task file: (valid records, problems), both in file order.

    Each record is the line's object with ``id`` filled in (a string; default ``"line-N"``) and ``line``
    (its 1-based line number) added.  Bad JSON, non-objects, a missing/empty ``context`` or ``question``,
    ``answers`` that are not a non-empty list of non-empty strings, a bad ``id`` and a duplicate ``id``
    (the later line) are reported as :class:`TaskFileProblem` and skipped; blank lines are ignored.
    A missing file raises ``FileNotFoundError`` naming it.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file not found: {str(p)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"task file is a directory, not a JSONL file: {str(p)!r}")
    records: list[dict[str, Any]] = []
    problems: list[TaskFileProblem] = []
    first_seen: dict[str, int] = {}  # id -> line
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.append(TaskFileProblem(number, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(TaskFileProblem(number, f"invalid JSON: {e.msg} (column {e.colno})"))
                continue
            why = _check_record(obj)
            if why is not None:
                problems.append(TaskFileProblem(number, why))
                continue
            rid = obj.get("id")
            rid = f"line-{number}" if rid is None else str(rid)
            if rid in first_seen:
                problems.append(TaskFileProblem(number, f"duplicate id {rid!r} (first on line {first_seen[rid]})"))
                continue
            first_seen[rid] = number
            records.append({**obj, "id": rid, "line": number})
    return records, problems


def make_file_sample(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    use_chat_template: bool | None = None,
    task: str = "file",
    max_new_tokens: int = 32,
) -> TaskSample:
    """A :class:`TaskSample` for one task-file record (scored "part": any accepted answer).

    The prompt is instruction + context + question + "Answer:", in a user turn when the tokenizer has a
    chat template (``use_chat_template`` None: auto).  ``target_tokens`` equals the prompt's length.
    """
    why = _check_record(record)
    if why is not None:
        raise ValueError(f"invalid task record {record.get('id') if isinstance(record, dict) else record!r}: {why}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    chat = _use_chat(tokenizer, use_chat_template)
    frame = _make_frame(tokenizer, chat, FILE_INSTRUCTION, f"Question: {record['question'].strip()}",
                        FILE_ANSWER_PREFIX)
    context = _Context(record["context"].strip(), [])
    text = frame.before + context.text + frame.after
    ids, offsets = tokenize(tokenizer, text, frame.special)
    rid = record.get("id")
    return _assemble(
        task,
        tokenizer,
        _Built(ids, offsets, text, context, frame),
        sample_id=str(rid) if rid is not None else "record",
        answers=list(record["answers"]),
        target=len(ids),
        depth=None,
        meta={"scorer": "part", "line": record.get("line")},
        max_new_tokens=max_new_tokens,
    )
