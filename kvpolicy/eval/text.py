"""Tokenizer helpers shared by the synthetic tasks (``passkey``, ``tasks``, ``taskfile``).

* ``encode`` / ``tokenize``: token ids of a text (with character offsets when the tokenizer reports them);
* ``token_span``: the half-open token range covering a character range (e.g. a needle);
* ``haystack_sentences`` / ``sentence_counts``: the haystack sentences and their lazily filled token counts;
* ``tokenizer_cache``: memoised per-tokenizer state that disappears with its tokenizer.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from kvpolicy.eval.corpus import essay_text, split_sentences

__all__ = [
    "FILLER",
    "HAYSTACKS",
    "SentenceCounts",
    "encode",
    "haystack_sentences",
    "sentence_counts",
    "token_span",
    "tokenize",
    "tokenizer_cache",
]

HAYSTACKS = ("essays", "repeat")
FILLER = (  # the classic passkey filler (Mohtashami & Jaggi 2023)
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
COUNT_BLOCK = 512  # sentences tokenized per batch when filling a SentenceCounts

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# tokenization


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids of ``text`` (``special``: add the tokenizer's special tokens, e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize(tokenizer: Any, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """(ids, char offsets per token or None when the tokenizer cannot report them)."""
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return encode(tokenizer, text, special), None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_span(
    tokenizer: Any, text: str, special: bool, offsets: list[tuple[int, int]] | None, start: int, end: int
) -> tuple[int, int]:
    """Half-open token range covering chars [start, end) of ``text`` (``offsets`` from ``tokenize``)."""
    if offsets is not None:
        hit = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
        if hit:
            return hit[0], hit[-1] + 1
    # no offsets: count tokens of the text up to each end (may be off by one at the edges)
    return len(encode(tokenizer, text[:start].rstrip(), special)), len(encode(tokenizer, text[:end], special))


# --------------------------------------------------------------------------------------------------
# per-tokenizer caches

# id(tokenizer) -> (weak reference to it, {key: cached object}); entries vanish with their tokenizer
_CACHE: dict[int, tuple[weakref.ref[Any], dict[Hashable, Any]]] = {}


def tokenizer_cache(tokenizer: Any, key: Hashable, factory: Callable[[], T]) -> T:
    """The object cached for (``tokenizer``, ``key``), made by ``factory()`` on first use and dropped when the
    tokenizer is garbage collected. A tokenizer that cannot be weakly referenced gets a fresh object each call
    (caching by ``id`` alone could hand one tokenizer's counts to another)."""
    tid = id(tokenizer)
    hit = _CACHE.get(tid)
    if hit is None or hit[0]() is not tokenizer:
        try:
            ref = weakref.ref(tokenizer, lambda _r, k=tid: _CACHE.pop(k, None))
        except TypeError:
            return factory()
        hit = _CACHE[tid] = (ref, {})
    per_key = hit[1]
    if key not in per_key:
        per_key[key] = factory()
    return per_key[key]


# --------------------------------------------------------------------------------------------------
# haystack sentences and their token counts


@functools.lru_cache(maxsize=2)
def haystack_sentences(haystack: str) -> tuple[str, ...]:
    """The sentences of a haystack: ``"essays"`` (Paul Graham essays) or ``"repeat"`` (``FILLER``)."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACKS)}")
    return FILLER if haystack == "repeat" else tuple(split_sentences(essay_text()))


class SentenceCounts:
    """Token counts of ``" " + sentence`` for every sentence, filled lazily in blocks of ``COUNT_BLOCK``."""

    def __init__(self, sentences: Sequence[str]):
        self.sentences = sentences
        self.counts: list[int] = [-1] * len(sentences)  # tokens per sentence, -1 = not computed yet

    def get(self, tokenizer: Any, i: int) -> int:
        c = self.counts[i]
        if c < 0:
            lo = i - i % COUNT_BLOCK
            hi = min(lo + COUNT_BLOCK, len(self.sentences))
            batch = [" " + s for s in self.sentences[lo:hi]]
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            self.counts[lo:hi] = [len(x) for x in ids]
            c = self.counts[i]
        return c


def sentence_counts(tokenizer: Any, haystack: str) -> SentenceCounts:
    """The (cached, per tokenizer) sentence token counts of ``haystack``."""
    return tokenizer_cache(
        tokenizer, ("sentence_counts", haystack), lambda: SentenceCounts(haystack_sentences(haystack))
    )
