"""``niah_*``: needle in a haystack (one or more keys, values, distractor needles; three kinds of haystack)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvpolicy.eval.tasks.haystack import _corpus_haystack, _HaystackPlan, _line_haystack
from kvpolicy.eval.tasks.prompt import _assemble, _fit, _make_frame
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _WORD_KEYS, _distinct, _number, _rng, _uuid


@dataclass(frozen=True)
class _NiahSpec:
    haystack: str  # "repeat" (noise filler), "essays" or "needles" (distractor needles only)
    key: str  # "word" or "uuid"
    value: str  # "number" or "uuid"
    n_keys: int  # keys queried
    n_values: int  # values per queried key
    n_distractors: int  # needles with other keys among the haystack (besides an all-needle haystack)


_NIAH: dict[str, _NiahSpec] = {
    "niah_single_1": _NiahSpec("repeat", "word", "number", 1, 1, 0),
    "niah_single_2": _NiahSpec("essays", "word", "number", 1, 1, 0),
    "niah_single_3": _NiahSpec("essays", "word", "uuid", 1, 1, 0),
    "niah_multikey_1": _NiahSpec("essays", "word", "number", 1, 1, 3),
    "niah_multikey_2": _NiahSpec("needles", "word", "number", 1, 1, 0),
    "niah_multikey_3": _NiahSpec("needles", "uuid", "uuid", 1, 1, 0),
    "niah_multivalue": _NiahSpec("essays", "word", "number", 1, 4, 0),
    "niah_multiquery": _NiahSpec("essays", "word", "number", 4, 1, 0),
}
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."


def _make_niah(
    task: str, tokenizer: Any, target: int, seed: int, depth: float | None, chat: bool, sample_id: str
) -> TaskSample:
    spec = _NIAH[task]
    rng = _rng(task, seed)
    if depth is None:
        depth = rng.random()
    kind = "uuids" if spec.value == "uuid" else "numbers"
    one = kind[:-1]
    order = list(range(len(_WORD_KEYS)))  # word keys: a seeded permutation of all adjective-noun keys
    rng.shuffle(order)
    word_keys = (_WORD_KEYS[i] for i in order)

    def next_key(r: random.Random) -> str:
        if spec.key == "uuid":
            return _uuid(r)
        key = next(word_keys, None)
        if key is None:
            raise ValueError(f"{task} ran out of distinct keys ({len(_WORD_KEYS)}): the length is too large")
        return key

    n_used = spec.n_keys + spec.n_distractors
    keys = _distinct(lambda: next_key(rng), n_used)
    draw_value = (lambda: _uuid(rng)) if spec.value == "uuid" else (lambda: _number(rng))
    values = _distinct(draw_value, spec.n_keys * spec.n_values + spec.n_distractors)
    queried = keys[: spec.n_keys]
    needles: list[tuple[str, str]] = [  # (key, value); the queried needles first, in answer order
        (k, values[i * spec.n_values + j]) for i, k in enumerate(queried) for j in range(spec.n_values)
    ]
    answers = [v for _, v in needles]
    needles += [(k, values[len(answers) + i]) for i, k in enumerate(keys[spec.n_keys :])]
    depths = [depth] + [rng.random() for _ in needles[1:]]  # the first queried needle goes at ``depth``
    inserts = [(d, _NEEDLE.format(kind=kind, key=k, value=v)) for d, (k, v) in zip(depths, needles)]

    if spec.haystack == "needles":  # distractor needles with fresh keys and values, generated in order
        hay_rng = _rng(task, seed, "haystack")
        taken = set(keys) | set(answers)
        lines: list[str] = []

        def line(j: int) -> str:
            while len(lines) <= j:
                k = next_key(hay_rng)
                v = _uuid(hay_rng) if spec.value == "uuid" else _number(hay_rng)
                if k in taken or v in taken:
                    continue
                taken.update((k, v))
                lines.append(_NEEDLE.format(kind=kind, key=k, value=v))
            return lines[j]

        limit = len(_WORD_KEYS) - n_used if spec.key == "word" else 10**8
        hay = _line_haystack(tokenizer, line, limit, "distractor-needle")
    else:
        first = rng.randrange(10**9)  # start sentence (mod the corpus size)
        hay = _corpus_haystack(tokenizer, spec.haystack, first)

    if spec.n_keys > 1:
        listed = ", ".join(queried[:-1]) + f", and {queried[-1]}"
        question = f"What are all the special magic {kind} for {listed} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {listed} mentioned in the provided text are"
        instruction = f"Some special magic {kind} are hidden within the following text."
    elif spec.n_values > 1:
        question = f"What are all the special magic {kind} for {queried[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {queried[0]} mentioned in the provided text are"
        instruction = f"Some special magic {kind} are hidden within the following text."
    else:
        question = f"What is the special magic {one} for {queried[0]} mentioned in the provided text?"
        prefix = f"The special magic {one} for {queried[0]} mentioned in the provided text is"
        instruction = f"A special magic {one} is hidden within the following text."
    it = "it" if len(needles) == 1 and spec.haystack != "needles" else "them"
    instruction += f" Memorize {it} carefully: you will be asked about {it} afterwards."
    frame = _make_frame(tokenizer, chat, instruction, question, prefix)
    built = _fit(tokenizer, frame, _HaystackPlan(tokenizer, hay, inserts), target, task)
    return _assemble(
        task,
        tokenizer,
        built,
        sample_id=sample_id,
        answers=answers,
        target=target,
        depth=depth,
        meta={"keys": queried, "distractor_keys": keys[spec.n_keys :], "haystack": spec.haystack},
        marks_key="needle_spans",  # (start, end) tokens per needle: queried ones first (answer order)
        depths_key="needle_depths",
    )
