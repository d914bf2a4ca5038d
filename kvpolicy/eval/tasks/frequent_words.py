"""``fwe``: frequent words extraction from Zipf-distributed coded words."""

from __future__ import annotations

from typing import Any

from kvpolicy.eval.tasks.haystack import _pieces_for
from kvpolicy.eval.tasks.prompt import _assemble, _Context, _fit, _make_frame, _Plan
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _rng


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


def _make_fwe(
    task: str, tokenizer: Any, target: int, seed: int, depth: None, chat: bool, sample_id: str
) -> TaskSample:
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
