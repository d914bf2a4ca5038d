"""Haystacks of sentences or generated lines, their token counts (per-tokenizer caches), and the plan that
weaves fixed inserts (needles, statements) into them at given depths."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpolicy.eval.tasks.prompt import _Context, _Plan
from kvpolicy.eval.text import sentence_counts, tokenizer_cache


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
