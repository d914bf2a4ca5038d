"""``vt``: variable tracking, a chain of assignments hidden in noise; name every variable holding the value."""

from __future__ import annotations

from typing import Any

from kvpolicy.eval.tasks.haystack import _corpus_haystack, _HaystackPlan
from kvpolicy.eval.tasks.prompt import _assemble, _fit, _make_frame
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _distinct, _rng


def _make_vt(
    task: str, tokenizer: Any, target: int, seed: int, depth: None, chat: bool, sample_id: str
) -> TaskSample:
    rng = _rng(task, seed)
    hops = 4
    example = ("QWXZK", "PLMNB", "10101")  # used in the instruction; never drawn below
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = _distinct(lambda: "".join(rng.choice(letters) for _ in range(5)), hops + 1, exclude=example[:2])
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in statements)  # in chain order
    hay = _corpus_haystack(tokenizer, "repeat", rng.randrange(10**9))
    instruction = (
        "Memorize and track the chain of variable assignments hidden in the following text. For example, after "
        f"'VAR {example[0]} = {example[2]}.' and later 'VAR {example[1]} = VAR {example[0]}.', both {example[0]} "
        f"and {example[1]} hold the value {example[2]}."
    )
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables "
        f"are assigned the value {value}; they are:"
    )
    frame = _make_frame(tokenizer, chat, instruction, question, prefix)
    built = _fit(tokenizer, frame, _HaystackPlan(tokenizer, hay, list(zip(depths, statements))), target, task)
    return _assemble(
        task, tokenizer, built, sample_id=sample_id, answers=names, target=target, depth=None,
        meta={"value": value}, marks_key="statement_spans", depths_key="statement_depths",
    )
