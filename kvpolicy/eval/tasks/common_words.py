"""``cwe``: common words extraction from a numbered word list."""

from __future__ import annotations

import functools
import re
from typing import Any

from kvpolicy.eval import corpus
from kvpolicy.eval.tasks.haystack import _pieces_for, _Prefix
from kvpolicy.eval.tasks.prompt import _assemble, _Context, _fit, _make_frame, _Plan
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _rng
from kvpolicy.eval.text import encode


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


def _make_cwe(
    task: str, tokenizer: Any, target: int, seed: int, depth: None, chat: bool, sample_id: str
) -> TaskSample:
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
