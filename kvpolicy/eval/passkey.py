"""Passkey retrieval: a 5-digit key hidden at a chosen depth in real essays (Paul Graham haystack).

The prompt is: instruction, haystack of whole essay sentences with the needle sentence inserted at the
sentence boundary nearest ``depth``, then the question.  Instruct models get their chat template (ending
at the assistant turn, so they answer naturally); base models get a plain completion ending in
"The pass key is".  A model that keeps the needle's KV answers the key; a KV policy that drops it fails.

Measured baseline (SmolLM2-135M-Instruct, full KV, greedy 12 tokens, essays, seeds 0-3 x depths
0.1/0.5/0.9): 2/12 found at 4k with the chat template, 5/12 with ``use_chat_template=False``; at <= 1k
the filler and chat prompts mostly succeed.  The 135M model often answers "The pass key is a term
coined by ...", so condition policy accuracy on samples the dense model gets right (or use a larger model).

Building a prompt tokenizes only its own pieces: per-sentence token counts are cached per tokenizer and
the final prompt is tokenized once (rarely twice or three times) to hit the length and locate the needle.
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

from kvpolicy.eval.text import FILLER, HAYSTACKS, encode, sentence_counts, token_span, tokenize

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "INSTRUCTION",
    "NEEDLE",
    "QUESTION",
    "BASE_ANSWER_PREFIX",
    "FILLER",
    "HAYSTACKS",
    "PasskeySample",
    "make_passkey_sample",
    "score_passkey",
]

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NEEDLE = " The pass key is {passkey}. Remember it. {passkey} is the pass key. "
QUESTION = "What is the pass key?"
BASE_ANSWER_PREFIX = "The pass key is"
_PLACEHOLDER = "<<<KVPOLICY_HAYSTACK>>>"


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt.

    ``prompt_ids`` (T,) are the full model input, special/template tokens included (feed them as is,
    without adding BOS again).  ``needle_token_span`` is the half-open token range [start, end) covering
    the needle sentences.  ``context_tokens`` is the actual T (at most the requested ``target_tokens``).
    """

    prompt_ids: list[int]  # (T,) token ids
    passkey: str  # 5 digits
    depth: float  # requested depth in [0, 1]
    context_tokens: int  # actual T = len(prompt_ids)
    needle_token_span: tuple[int, int]  # [start, end) token positions of the needle
    target_tokens: int  # requested length
    needle_depth: float  # achieved depth: haystack tokens before the needle / all haystack tokens
    prompt: str  # the prompt text that was tokenized
    chat_template: bool  # whether the tokenizer's chat template was used
    seed: int

    def input_ids(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The prompt as a (1, T) LongTensor, ready for ``model.generate(input_ids=...)``."""
        import torch

        return torch.tensor([self.prompt_ids], dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------
# prompt construction


def _frame(tokenizer: Any, chat: bool, answer_prefix: str) -> tuple[str, str]:
    """(text before the haystack, text after it), template markup included."""
    if not chat:
        return INSTRUCTION + "\n\n", "\n\n" + QUESTION + (" " + answer_prefix if answer_prefix else "")
    content = f"{INSTRUCTION}\n\n{_PLACEHOLDER}\n\n{QUESTION}"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or rendered.count(_PLACEHOLDER) != 1:
        raise ValueError("the tokenizer's chat template did not keep the user message verbatim")
    before, after = rendered.split(_PLACEHOLDER)
    return before, after + answer_prefix


def make_passkey_sample(
    tokenizer: Any,
    *,
    context_tokens: int,
    depth: float,
    passkey: int | str | None = None,
    seed: int = 0,
    use_chat_template: bool | None = None,
    answer_prefix: str | None = None,
    haystack: str = "essays",
    haystack_start: int | None = None,
) -> PasskeySample:
    """Build a passkey prompt of about ``context_tokens`` tokens with the needle at ``depth``.

    ``context_tokens`` is the total prompt length (template tokens included); the result has at most
    that many tokens and is short of it by less than one essay sentence (~25 tokens).  ``depth`` in
    [0, 1] places the needle at the nearest sentence boundary (0 = right after the instruction,
    1 = right before the question).  ``passkey`` defaults to 5 random digits from
    ``random.Random(seed)``; the seed also picks where in the essays the haystack starts.
    ``use_chat_template`` None means "if the tokenizer has one".  ``answer_prefix`` is appended after
    the prompt (default: nothing for chat models, ``"The pass key is"`` for base models).
    ``haystack``: ``"essays"`` (Paul Graham essays, NIAH style) or ``"repeat"`` (the classic passkey
    filler "The grass is green. The sky is blue. ..." repeated, an easier task); ``haystack_start``
    overrides the seed-chosen first sentence.  Deterministic for given arguments and tokenizer.
    """
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACKS)}")
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int):
        raise TypeError(f"context_tokens must be an int, not {type(context_tokens).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, Real):
        raise TypeError(f"depth must be a number in [0, 1], not {type(depth).__name__}")
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")

    rng = random.Random(seed)
    drawn = rng.randint(10000, 99999)  # always drawn, so the haystack offset below does not depend on passkey
    if passkey is None:
        key = str(drawn)
    elif isinstance(passkey, bool) or not isinstance(passkey, (int, str)):
        raise TypeError(f"passkey must be an int, a digit string or None, not {type(passkey).__name__}")
    else:
        key = str(passkey)
        if not key.isdigit():
            raise ValueError(f"passkey must be non-negative digits, got {passkey!r}")

    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if use_chat_template is None else bool(use_chat_template)
    if chat and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    if answer_prefix is None:
        answer_prefix = "" if chat else BASE_ANSWER_PREFIX
    special = not chat  # a rendered chat template already holds BOS etc. as text

    before_text, after_text = _frame(tokenizer, chat, answer_prefix)
    needle = NEEDLE.format(passkey=key)
    # fixed cost in tokens (approximate: pieces are tokenized separately here)
    overhead = len(encode(tokenizer, before_text + after_text, special)) + len(
        encode(tokenizer, needle.strip(), False)
    )
    budget = context_tokens - overhead  # haystack tokens wanted
    if budget < 1:
        raise ValueError(
            f"context_tokens={context_tokens} is too small: instruction, needle and question alone take "
            f"~{overhead} tokens"
        )

    counts = sentence_counts(tokenizer, haystack)
    sentences = counts.sentences
    n_total = len(sentences)
    limit = n_total if haystack == "essays" else sys.maxsize  # max haystack sentences (filler repeats)
    first = rng.randrange(n_total)  # the haystack starts at this sentence and wraps around the essays
    if haystack_start is not None:
        if isinstance(haystack_start, bool) or not isinstance(haystack_start, int):
            raise TypeError(f"haystack_start must be an int or None, not {type(haystack_start).__name__}")
        first = haystack_start % n_total

    def sent(j: int) -> str:  # j-th haystack sentence
        return sentences[(first + j) % n_total]

    def count(j: int) -> int:  # its estimated token count
        return max(1, counts.get(tokenizer, (first + j) % n_total))

    n, est = 0, 0  # n sentences, estimated haystack tokens: largest n that fits the budget
    while n < limit and est + count(n) <= budget:
        est += count(n)
        n += 1
    if n == limit:
        raise ValueError(f"context_tokens={context_tokens} exceeds the essay corpus (~{est} tokens)")

    def build(n: int) -> tuple[list[int], list[tuple[int, int]] | None, str, int, int, float]:
        cum = [0]  # cum[j] = estimated tokens of haystack sentences [0, j), (n + 1,)
        for j in range(n):
            cum.append(cum[-1] + count(j))
        k = min(range(n + 1), key=lambda j: (abs(cum[j] - depth * cum[n]), j))  # needle boundary
        left = " ".join(sent(j) for j in range(k))
        right = " ".join(sent(j) for j in range(k, n))
        ndl = needle if left else needle.lstrip()
        ndl = ndl if right else ndl.rstrip()
        prompt = before_text + left + ndl + right + after_text
        n_start = len(before_text) + len(left) + (len(ndl) - len(ndl.lstrip()))  # char index of "The"
        ids, offsets = tokenize(tokenizer, prompt, special)
        return ids, offsets, prompt, n_start, n_start + len(needle.strip()), (cum[k] / cum[n] if n else 0.0)

    # Pieces were counted separately, so the estimate can be off by a few tokens: tokenize the real prompt
    # and add/drop sentences until it is the longest that fits (usually 1-2 tokenizations).
    best = None
    tried: set[int] = set()
    while n not in tried:
        tried.add(n)
        built = build(n)
        length = len(built[0])
        if length <= context_tokens and (best is None or length > len(best[0])):
            best = built
        delta, m = context_tokens - length, n  # tokens to gain (> 0) or lose (< 0)
        if delta >= 0:
            while m < limit - 1 and count(m) <= delta:
                delta -= count(m)
                m += 1
        else:
            while m > 0 and delta < 0:
                m -= 1
                delta += count(m)
        n = m
    if best is None:
        raise ValueError(f"could not fit a passkey prompt into context_tokens={context_tokens}")
    ids, offsets, prompt, n_start, n_end, achieved = best
    span = token_span(tokenizer, prompt, special, offsets, n_start, n_end)
    return PasskeySample(
        prompt_ids=ids,
        passkey=key,
        depth=depth,
        context_tokens=len(ids),
        needle_token_span=span,
        target_tokens=context_tokens,
        needle_depth=achieved,
        prompt=prompt,
        chat_template=chat,
        seed=seed,
    )


def score_passkey(sample: PasskeySample | str, generated_text: str) -> bool:
    """True when the passkey's digits appear in ``generated_text`` as a whole number.

    ``sample`` may be a :class:`PasskeySample` or the passkey string itself.
    """
    key = sample.passkey if isinstance(sample, PasskeySample) else sample
    if not isinstance(key, str) or not key.isdigit():
        raise TypeError("sample must be a PasskeySample or a digit string")
    if not isinstance(generated_text, str):
        raise TypeError(f"generated_text must be a str, not {type(generated_text).__name__}")
    return re.search(rf"(?<!\d){key}(?!\d)", generated_text) is not None
