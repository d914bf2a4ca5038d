"""Long-generation fidelity (``kvpolicy eval --task longgen``): how far each policy's next-token distribution drifts
from the full cache's over a long generation, position by position.

The case is chain-of-thought: over a long generation the pages written while decoding matter, and small errors
can compound. Per (prompt length ``L``, sample):

1. The prompt is ``L`` tokens of the essays (``kvpolicy.eval.corpus``, the text ``--fidelity`` reads), starting at
   a sentence drawn from the sample's seed.
2. The full cache (a dense ``DynamicCache``) generates ``N`` tokens greedily, once, keeping each position's
   log-probabilities. End-of-sequence tokens are never chosen (they are banned from the greedy choice, here and
   in the policies' top-1), so every sample has ``N`` positions.
3. Every policy decodes the same ``N`` tokens under teacher forcing: its cache holds the prompt (from the shared
   dense prefill, or its own prefill for prefill-eviction policies) and each step is fed the full cache's token
   (``kvpolicy.eval.teacher``), so pages written during decoding go to the index and the pool as in generation.

Per generated position ``t`` (``0 .. N-1``): ``agree[t]``, whether the policy's greedy token equals the full
cache's, and ``kl[t]``, KL(full || policy) of the two next-token distributions in nats. Position 0 is predicted by
the prompt's forward, dense for every policy here (rows' ``first_token``: ``"dense_prefill"``), so there
agreement is 1 and KL 0 by construction.

A row (no ``score``: this is not task accuracy) holds ``agreement`` and ``kl`` (means over the positions), the same
over the last quarter (``agreement_last_quarter``, ``kl_last_quarter``), ``first_disagreement`` (the first position
whose top-1 differs; None if none), and the curves ``agreement_curve`` / ``kl_curve``: means over consecutive bins
of ``curve_bin`` positions (64, fewer for short runs so that a curve has at least 16 points; the last bin may be
shorter). ``kvpolicy report`` tabulates the means and plots the curves, one figure per budget. A greedy text that
loops is easy to agree on from the recent window alone, so rows also say how varied the full cache's continuation
is (``reference_distinct_4grams``: the share of distinct token 4-grams) and show its beginning (``reference_text``).

Memory: the full cache's log-probabilities wait on the CPU for the policies' steps, ``N x vocab`` floats (622 MB
for 1,024 tokens of Qwen2.5's 151,936-token vocabulary).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpolicy.eval.runner import FIRST_DENSE, LONGGEN, EvalJob, dense_prefill
from kvpolicy.eval.teacher import forced_logits
from kvpolicy.generation import prefill
from kvpolicy.hf import KVPolicyCache

__all__ = ["LongGenSample", "binned", "curve_bin", "longgen_jobs", "longgen_row", "longgen_sample"]

MAX_BIN = 64  # positions per curve point
MIN_POINTS = 16  # a short run gets smaller bins, so that its curve still has this many points
CHARS_PER_TOKEN = 12  # essay characters read per prompt token (generous: ~4-5 per token for English BPE)
REFERENCE_CHARS = 600  # of the full cache's continuation, kept in each row (to see what was generated)


def curve_bin(n: int) -> int:
    """Positions per curve point for ``n`` generated tokens."""
    return max(1, min(MAX_BIN, n // MIN_POINTS))


def binned(values: Sequence[float], width: int) -> list[float]:
    """Means of consecutive runs of ``width`` values (the last run may be shorter)."""
    return [statistics.fmean(values[i : i + width]) for i in range(0, len(values), width)]


def longgen_jobs(jobs: Sequence[EvalJob]) -> list[EvalJob]:
    """The jobs that longgen runs: the question modes (``-qhidden``, ``+qafter``) have no question here."""
    return [j for j in jobs if not j.hide_question and not j.question_after]


@dataclass
class LongGenSample:
    """One prompt and the full cache's continuation of it, shared by every policy."""

    prompt: torch.Tensor  # [1, L] token ids
    dense: Any  # DynamicCache holding the prompt (not modified by the policies)
    first_logits: torch.Tensor  # [1, vocab] the dense prefill's last position: predicts position 0
    tokens: torch.Tensor  # [1, N] the full cache's greedy continuation
    logp: torch.Tensor  # [N, vocab] float32, CPU: the full cache's log-probabilities at each position
    banned: list[int]  # end-of-sequence ids, never chosen
    seconds: float  # the dense prefill and the full cache's generation
    text: str = ""  # the continuation, decoded

    def distinct_ngrams(self, n: int = 4) -> float:
        """Share of distinct token n-grams among the continuation's n-grams: near 0 for a text that loops (easy to
        agree on from the recent window alone), near 1 for varied text."""
        t = self.tokens[0].tolist()
        grams = [tuple(t[i : i + n]) for i in range(len(t) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 1.0


def _banned_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


def _greedy(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """logits [1, vocab] -> the greedy token [1, 1], never a banned one."""
    if banned:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def _prompt(tokenizer: Any, L: int, seed: int) -> torch.Tensor:
    from kvpolicy.eval.corpus import essay_text

    text = essay_text()
    need = CHARS_PER_TOKEN * L
    if len(text) < need:
        raise ValueError(f"the essay corpus has {len(text)} characters, too few for a {L}-token longgen prompt")
    start = random.Random(seed).randrange(0, len(text) - need + 1)
    dot = text.find(". ", start, start + 2000)  # begin at a sentence
    start = dot + 2 if dot >= 0 and len(text) - (dot + 2) >= need else start
    ids = tokenizer(text[start : start + need], return_tensors="pt")["input_ids"][:, :L]
    if ids.shape[1] < L:
        raise ValueError(f"{need} characters of the essays gave {ids.shape[1]} tokens, fewer than {L}")
    return ids


def longgen_sample(model: Any, tokenizer: Any, L: int, n: int, *, seed: int, prefill_chunk: int | None = None,
                   step: Callable[[], None] = lambda: None) -> LongGenSample:
    """The prompt of ``L`` tokens for ``seed``, its dense prefill, and the full cache's ``n`` greedy tokens with
    their log-probabilities; ``step`` is called after each generated token (progress)."""
    if n < 1:
        raise ValueError(f"longgen needs at least 1 generated token, got {n}")
    t0 = time.perf_counter()
    prompt = _prompt(tokenizer, L, seed).to(model.device)
    dense, first_logits = dense_prefill(model, prompt, prefill_chunk)
    banned = _banned_ids(model, tokenizer)
    cache = copy.deepcopy(dense)  # the generation extends it; the policies start from the prompt alone
    logits = first_logits.float()
    toks, logp = [], []
    for t in range(n):
        toks.append(_greedy(logits, banned))
        logp.append(torch.log_softmax(logits, -1)[0].cpu())
        step()
        if t + 1 < n:
            logits = next(forced_logits(model, cache, toks[-1]))
    tokens = torch.cat(toks, 1)
    text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
    return LongGenSample(prompt, dense, first_logits, tokens, torch.stack(logp), banned, time.perf_counter() - t0,
                         text)


def _kl(logp_full: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(full || policy) in nats; logp_full [vocab] (CPU), logits [1, vocab]."""
    lp = torch.log_softmax(logits.float(), -1)[0].cpu()
    p = logp_full.exp()
    return max(0.0, float(torch.where(p > 0, p * (logp_full - lp), 0.0).sum()))  # >= 0 (rounding: -1e-8)


def longgen_row(model: Any, s: LongGenSample, job: EvalJob, step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Agreement and KL of ``job``'s policy against the full cache on ``s`` (the module docstring); ``step`` is
    called after each position."""
    if job.hide_question or job.question_after:
        raise ValueError(f"{job.label!r}: longgen has no question to hide or to read after compression")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if job.own_prefill:  # the selector scores the prompt's queries: its own (dense) prompt forward
            cache = KVPolicyCache(model, job.policy, prefetch=job.prefetch)
            first = prefill(model, cache, s.prompt, None)
        else:
            cache = KVPolicyCache.from_dense(model, job.policy, s.dense, prefetch=job.prefetch)
            first = s.first_logits
    agree: list[float] = []
    kl: list[float] = []

    def measure(t: int, logits: torch.Tensor) -> None:
        agree.append(float(int(_greedy(logits.float(), s.banned)) == int(s.tokens[0, t])))
        kl.append(_kl(s.logp[t], logits))
        step()

    measure(0, first)
    for t, logits in enumerate(forced_logits(model, cache, s.tokens[:, :-1]), 1):
        measure(t, logits)
    n = len(agree)
    q = max(1, n // 4)
    width = curve_bin(n)
    b = job.policy.resolve_budget()
    mem = cache.memory()
    miss = next((t for t, a in enumerate(agree) if a < 1.0), None)
    return {
        "task": LONGGEN, "source": "essays", "length": s.prompt.shape[1], "context_tokens": s.prompt.shape[1],
        "generated_tokens": n, "policy": job.label, "budget_tokens": job.budget, "budget_resolved": b.describe(),
        "agreement": statistics.fmean(agree), "kl": statistics.fmean(kl),
        "agreement_last_quarter": statistics.fmean(agree[-q:]), "kl_last_quarter": statistics.fmean(kl[-q:]),
        "kl_max": max(kl), "first_disagreement": miss, "curve_bin": width,
        "agreement_curve": binned(agree, width), "kl_curve": [round(x, 6) for x in binned(kl, width)],
        "first_token": FIRST_DENSE, "seconds": time.perf_counter() - t0, "reference_seconds": s.seconds,
        "reference_distinct_4grams": s.distinct_ngrams(4), "reference_text": s.text[:REFERENCE_CHARS],
        "device_kv_bytes": mem["device_kv"], "cpu_kv_bytes": mem["cpu_kv"], "index_bytes": mem["index"],
        "policy_config": job.policy.to_config() | ({"prefetch": job.prefetch} if job.prefetch != "off" else {}),
    }
