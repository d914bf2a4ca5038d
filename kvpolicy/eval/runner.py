"""``kvpolicy eval``: task accuracy per (task, length, policy, budget) on a real model, resumable.

For every sample the prompt's prefill runs **once**, densely, with the greedy first answer token; every policy
whose selector does not score the prompt then decodes the rest of the answer from that prefill
(``KVPolicyCache.from_dense``: the K/V really move to CPU pages). Policies that score the prompt at prefill
(``needs_prompt_queries``: SnapKV, H2O) run their own prefill through the cache. SnapKV runs twice, with the
question visible to its observation window (``snapkv``) and hidden from it (``snapkv-qhidden``: the window ends
before the question).

Where the first answer token comes from is part of what a policy is tested on, so every row says it
(``first_token``): ``"dense_prefill"`` wherever the prompt's forward attends densely (every policy above: decode-time
methods such as IceCache and Quest are meant to run so, and it hands the prefill-eviction baselines their first
token too), ``"policy"`` in the ``+qafter`` mode (``snapkv+qafter``, ``h2o+qafter``: kvpress's setting), where a
prefill-eviction policy reads and compresses the context alone and the question is then read over the compressed
cache, one decode step per token (``kvpolicy.eval.teacher``), so the first answer token, like every later one,
comes from the compressed cache. The question's tokens join the recent window as generated tokens do (SnapKV never
selects pages written after its prefill; H2O admits them as heavy-hitter candidates).

``--task longgen`` (``kvpolicy.eval.longgen``) measures, instead of an answer, how a policy's next-token
distribution drifts from the full cache's over a long generation.

One JSON object per (sample, policy, budget) is appended to ``out`` as soon as it is known, so a run that stops
can be resumed: rows already in the file (same model, task, length, sample, policy, budget, seed) are skipped;
error rows of failed cells are tried again and replaced (``kvpolicy.eval.results_file``).
``kvpolicy report`` aggregates rows into tables and plots.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.context_length import check_context_length
from kvpolicy.eval.results_file import check_results_path, open_results
from kvpolicy.eval.tasks import TaskSample, make_sample, score_sample
from kvpolicy.generation import prefill
from kvpolicy.hf import KVPolicyCache, policy_attention
from kvpolicy.policy import Policy, split_placement
from kvpolicy.pool_dtype import check_pool_dtype
from kvpolicy.prefetch import split_prefetch

__all__ = ["FIRST_DENSE", "FIRST_POLICY", "EvalJob", "QAFTER_SUFFIX", "QHIDDEN_SUFFIX", "dense_prefill", "eval_jobs",
           "read_rows", "row_key", "run_eval"]

QHIDDEN_SUFFIX = "-qhidden"
QAFTER_SUFFIX = "+qafter"  # the question is read after the context was compressed (prefill-eviction policies)
FIRST_DENSE = "dense_prefill"  # rows' first_token: the first answer token came from a dense prompt forward
FIRST_POLICY = "policy"  # ... from the policy's own (compressed) cache
LONGGEN = "longgen"  # the task name of long-generation fidelity rows (kvpolicy.eval.longgen)
REQUIRED_KEYS = ("model", "task", "length", "policy", "budget_tokens", "score", "n")


@dataclass(frozen=True, eq=False)
class EvalJob:
    """One (policy, budget) cell; ``policy`` is resolved, ``label`` is what rows call it."""

    label: str
    budget: int | None
    policy: Policy
    hide_question: bool = False
    prefetch: str = "off"  # KVPolicyCache(prefetch=...): a "+prefetch"/"+estimate" suffix, kept in the label
    question_after: bool = False  # "+qafter": compress the context, then read the question over the compressed cache

    @property
    def own_prefill(self) -> bool:
        return self.policy.selector_cls.needs_prompt_queries

    @property
    def first_token(self) -> str:
        """Where the first answer token comes from (rows' ``first_token``)."""
        return FIRST_POLICY if self.question_after else FIRST_DENSE


def eval_jobs(policies: Sequence[str], budgets: Sequence[int], cpu_pool_dtype: str | None = None) -> list[EvalJob]:
    """Every (policy, budget); policies that read every page (``full``) once, unlimited; ``snapkv`` also with the
    question hidden. A name may carry a placement, ``NAME[@INDEX_DEVICE][:TRANSFER]`` (``icecache@cuda:uva``):
    it changes where the work runs, not the rows' policy label (the placement is in ``policy_config``).
    ``cpu_pool_dtype`` (``None``: each policy's own, ``"auto"`` unless it says otherwise) sets how every policy's
    CPU pages are stored; fp8 changes the results, so those labels end in ``+fp8`` (``icecache+fp8``: rows of both
    can share a file and be compared with ``report --compare icecache,icecache+fp8``).
    A name ending in ``+qafter`` (``snapkv+qafter``, ``h2o+qafter``) runs a prefill-eviction policy with the
    question read after the context was compressed (the module docstring); other policies attend the whole
    prompt at prefill, so for them the mode is refused.
    Unknown names, bad budgets and one policy placed twice fail here, before any model work."""
    if cpu_pool_dtype is not None:
        check_pool_dtype(cpu_pool_dtype)
    jobs: list[EvalJob] = []
    seen: dict[str, str] = {}
    for spec in policies:
        qafter = spec.endswith(QAFTER_SUFFIX)
        placed, prefetch = split_prefetch(spec[: -len(QAFTER_SUFFIX)] if qafter else spec)
        if QAFTER_SUFFIX in placed:
            raise ValueError(f"policy {spec!r}: {QAFTER_SUFFIX!r} goes last (e.g. 'snapkv{QAFTER_SUFFIX}')")
        name, index_device, transfer = split_placement(placed)
        suffix = spec[len(placed):]  # the prefetch mode changes the results (estimate): it is part of the label
        suffix = suffix[: -len(QAFTER_SUFFIX)] if qafter else suffix
        key = name + suffix + (QAFTER_SUFFIX if qafter else "")
        if key in seen:
            raise ValueError(f"policy {name!r} is listed twice ({seen[key]!r} and {spec!r}); rows are keyed by name")
        seen[key] = spec
        hidden = name.endswith(QHIDDEN_SUFFIX)
        base = Policy.resolve(name[: -len(QHIDDEN_SUFFIX)] if hidden else name).placed(index_device, transfer)
        if cpu_pool_dtype is not None:
            base = dataclasses.replace(base, cpu_pool_dtype=cpu_pool_dtype)
        tag = "" if base.cpu_pool_dtype == "auto" else f"+{base.cpu_pool_dtype}"
        suffix += tag
        if hidden and not base.selector_cls.needs_prompt_queries:
            raise ValueError(f"{name!r}: only prefill-scoring selectors (snapkv, h2o) have a question-hidden mode")
        if qafter and not base.selector_cls.needs_prompt_queries:
            raise ValueError(
                f"{spec!r}: {QAFTER_SUFFIX!r} is for policies that evict at prefill (snapkv, h2o); selector "
                f"{base.selector.name!r} attends the whole prompt exactly at prefill, so reading the question "
                "after the context changes nothing")
        if qafter and hidden:
            raise ValueError(f"{spec!r}: {QAFTER_SUFFIX!r} already keeps the question from the prefill's scoring; "
                             f"drop {QHIDDEN_SUFFIX!r}")
        if qafter:
            suffix += QAFTER_SUFFIX
        if not base.selector_cls.uses_budget:
            jobs.append(EvalJob(name + suffix, None, base.with_budget(None), prefetch=prefetch, question_after=qafter))
            continue
        for b in budgets:
            jobs.append(EvalJob(name + suffix, b, base.with_budget(b), hidden, prefetch, qafter))
        if base.selector.name == "snapkv" and not hidden and not qafter and not any(
            split_placement(p)[0] == f"{name}{QHIDDEN_SUFFIX}" for p in policies
        ):
            jobs += [EvalJob(f"{name}{QHIDDEN_SUFFIX}{tag}", b, base.with_budget(b), True) for b in budgets]
    return jobs


def row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["task"], row["length"], row["sample"], row["policy"], row["budget_tokens"], row["seed"])


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file (a missing file is empty; a torn last line from an interrupted run is skipped)."""
    p = check_results_path(path)
    if not p.exists():
        return []
    rows = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _task_length(unit) -> tuple[str, int]:
    return (unit.task, unit.target_tokens) if isinstance(unit, TaskSample) else unit


def _git_sha() -> str | None:
    from kvpolicy.eval.ablate import _git_sha as sha

    return sha()


def _policy_for(job: EvalJob, sample: TaskSample) -> Policy:
    if not job.hide_question:
        return job.policy
    if sample.question_span is None:
        raise ValueError(f"task {sample.task!r} has no question span to hide")
    offset = sample.context_tokens - sample.question_span[0]  # the window ends where the question starts
    sel = {**job.policy.selector.to_config(), "obs_offset": offset}
    return dataclasses.replace(job.policy, selector=sel)


def question_start(sample: TaskSample) -> int:
    """The token position where the sample's question starts: what the ``+qafter`` mode compresses ends there."""
    if sample.question_span is None:
        raise ValueError(f"task {sample.task!r} has no question span: {QAFTER_SUFFIX!r} cannot tell its context from "
                         "its question")
    cut = sample.question_span[0]
    if not 0 < cut < sample.context_tokens:
        raise ValueError(f"sample {sample.id!r}: the question starts at token {cut} of {sample.context_tokens}; "
                         f"{QAFTER_SUFFIX!r} needs a context before it")
    return cut


def question_after_compression(model, cache, ids: torch.Tensor, cut: int) -> torch.Tensor:
    """The ``+qafter`` prompt: ``ids[:, :cut]`` (the context) in one forward through ``cache``, whose prefill-eviction
    selector scores and compresses it; then ``ids[:, cut:]`` (the question and the answer prefix) one decode step
    per token over the compressed cache. Returns the last step's logits ``[1, vocab]``: the first answer token's."""
    from kvpolicy.eval.teacher import forced_logits

    prefill(model, cache, ids[:, :cut], None)  # one forward: the selector sees every query of the context
    return collections.deque(forced_logits(model, cache, ids[:, cut:]), maxlen=1)[0]  # the last step's


@torch.inference_mode()
def dense_prefill(model, ids: torch.Tensor, prefill_chunk: int | None):
    """The shared dense prefill of a prompt ``ids`` ``[1, T]``: a filled ``DynamicCache`` and the last position's
    logits ``[1, vocab]`` (only those: the whole prompt's would be T x vocab floats, 10 GB for 16k tokens of Qwen2.5
    in float32, which once ran this CPU out of memory). Streamed ``prefill_chunk`` tokens per forward under the
    kvpolicy attention (no mask over earlier chunks), which is exact."""
    from transformers import DynamicCache

    dense = DynamicCache(config=model.config)
    with policy_attention(model) if prefill_chunk else contextlib.nullcontext():
        logits = prefill(model, dense, ids, prefill_chunk)
    return dense, logits


@torch.inference_mode()
def _decode(model, tokenizer, sample: TaskSample, job: EvalJob, dense, first) -> tuple[str, dict[str, int]]:
    ids = sample.input_ids(model.device)
    pol = _policy_for(job, sample)
    n = sample.max_new_tokens
    if job.question_after:  # kvpress's setting: the first answer token comes from the compressed cache
        cache = KVPolicyCache(model, pol, prefetch=job.prefetch)
        first = question_after_compression(model, cache, ids, question_start(sample)).argmax(-1, keepdim=True)
        rest = model.generate(torch.cat([ids, first], 1), **cache_kwargs(cache), max_new_tokens=max(n - 1, 1),
                              do_sample=False)[0, ids.shape[1] + 1:]
        out = torch.cat([first[0], rest])[:n]
    elif job.own_prefill:  # the selector scores the prompt: its prefill runs through the cache
        cache = KVPolicyCache(model, pol, prefetch=job.prefetch)
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    else:
        cache = KVPolicyCache.from_dense(model, pol, dense, prefetch=job.prefetch)
        rest = model.generate(torch.cat([ids, first], 1), **cache_kwargs(cache), max_new_tokens=max(n - 1, 1),
                              do_sample=False)[0, ids.shape[1] + 1:]
        out = torch.cat([first[0], rest])[:n]
    return tokenizer.decode(out, skip_special_tokens=True), cache.memory()


def run_eval(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    policies: Sequence[str],
    budgets: Sequence[int],
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    out: str | Path,
    seed: int = 0,
    samples_source: Iterable[TaskSample] | None = None,
    fidelity: bool = False,
    fidelity_queries: int = 8,
    continuation: int = 64,
    progress: bool = True,
    prefill_chunk: int | None = None,
    cpu_pool_dtype: str | None = None,
    failed: list[dict[str, Any]] | None = None,
    allow_overflow: bool = False,
    longgen_tokens: int = 1024,
) -> list[dict[str, Any]]:
    """Run the grid and append rows to ``out``; return the rows written now. ``samples_source`` replaces the
    generated samples (``--task-file``): then ``tasks``/``lengths``/``samples`` are ignored. ``fidelity`` adds,
    per length, one row per (policy, budget) of attention fidelity and perplexity on the essays
    (``kvpolicy.eval.fidelity``). ``prefill_chunk`` streams the shared dense prefill, that many tokens per forward
    (exact: the same rows, less activation memory). ``cpu_pool_dtype="fp8"``: every policy's CPU pages in fp8, rows
    labelled ``NAME+fp8`` (``eval_jobs``). Cells that fail are written as rows with an ``error`` (and
    appended to ``failed``); a rerun tries them again and replaces those rows. An advisory lock on ``out`` refuses
    a second concurrent writer (``ResultsLockedError``). A sample whose prompt plus answer tokens exceed the
    model's maximum position is a ``ContextLengthError`` before any model work, unless ``allow_overflow``.
    The task ``longgen`` in ``tasks`` adds, per length and sample, one row per (policy, budget) of long-generation
    fidelity over ``longgen_tokens`` generated tokens (``kvpolicy.eval.longgen``); a file holds one such length."""
    from rich.progress import Progress

    jobs = eval_jobs(policies, budgets, cpu_pool_dtype)
    do_longgen = samples_source is None and LONGGEN in tasks
    tasks = [t for t in tasks if t != LONGGEN]
    lg_jobs: list[EvalJob] = []
    if do_longgen:
        from kvpolicy.eval.longgen import longgen_jobs, longgen_row, longgen_sample

        if isinstance(longgen_tokens, bool) or not isinstance(longgen_tokens, int) or longgen_tokens < 1:
            raise ValueError(f"longgen_tokens must be a positive number of tokens, got {longgen_tokens!r}")
        lg_jobs = longgen_jobs(jobs)
        for L in lengths:
            check_context_length(model.config, L, longgen_tokens, allow_overflow=allow_overflow,
                                 what="the longgen prompt", hint="--allow-overflow")
        other = {r["generated_tokens"] for r in read_rows(out) if r.get("task") == LONGGEN and "generated_tokens" in r}
        if other - {longgen_tokens}:
            raise ValueError(f"{str(out)!r} holds longgen rows of {sorted(other)} generated tokens, not "
                             f"{longgen_tokens}; rows are keyed without it, so give another --out")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if samples_source is None:
        for L in lengths:
            if max_len and L > max_len:
                raise ValueError(f"length {L} is beyond the model's context of {max_len} tokens")
    check_results_path(out)
    sha = _git_sha()
    previous = model.config._attn_implementation
    written: list[dict[str, Any]] = []

    def plan() -> Iterable[tuple[int, Any]]:
        if samples_source is not None:
            for i, s in enumerate(samples_source):
                yield i, s
            return
        for task in tasks:
            for L in lengths:
                for i in range(samples):
                    yield i, (task, L)

    units = list(plan())
    for _, u in units:
        if isinstance(u, TaskSample):
            check_context_length(model.config, u.context_tokens, u.max_new_tokens, allow_overflow=allow_overflow,
                                 what=f"task record {u.id!r}", hint="--allow-overflow")
    planned = {(model_name, *_task_length(u), i, j.label, j.budget, seed) for i, u in units for j in jobs}
    if fidelity:
        planned |= {(model_name, "fidelity", L, 0, j.label, j.budget, seed) for L in lengths for j in jobs}
    lg_cells = [(L, i) for L in lengths for i in range(samples)] if do_longgen else []
    planned |= {(model_name, LONGGEN, L, i, j.label, j.budget, seed) for L, i in lg_cells for j in lg_jobs}
    total = len(units) * len(jobs) + len(lg_cells) * len(lg_jobs)
    retried = lambda r: "error" in r and row_key(r) in planned  # noqa: E731  (a rerun replaces its error rows)
    with open_results(out, drop=retried) as f, Progress(disable=not progress) as bar:
        done = {row_key(r) for r in read_rows(out) if "error" not in r}  # failed cells are tried again
        t_all = bar.add_task("eval", total=total)

        def fail(task: str, L: int, i: int, j: EvalJob, e: Exception) -> None:  # one cell fails, the grid goes on
            bar.console.print(f"[red]{task} {L} sample {i} {j.label} @ {j.budget}: {type(e).__name__}: {e}")
            row = {"model": model_name, "task": task, "length": L, "policy": j.label, "sample": i,
                   "budget_tokens": j.budget, "seed": seed, "error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(row) + "\n")
            f.flush()
            if failed is not None:
                failed.append(row)
            bar.advance(t_all)

        def emit(row: dict[str, Any], what: str) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()
            written.append(row)
            bar.advance(t_all)
            if progress and not bar.console.is_terminal:  # a log, not a live bar: one line per row
                done_n = int(bar.tasks[0].completed)
                bar.console.print(f"[{done_n}/{total}] {row['task']} {row['length']} sample {row['sample']} "
                                  f"{row['policy']} @ {row['budget_tokens'] or 'all'}: {what} "
                                  f"({row['seconds']:.1f} s)")

        for i, unit in units:
            if isinstance(unit, TaskSample):
                sample, task, L = unit, unit.task, unit.target_tokens
            else:
                task, L = unit
                sample = None
            todo = [j for j in jobs if (model_name, task, L, i, j.label, j.budget, seed) not in done]
            if not todo:
                bar.advance(t_all, len(jobs))
                continue
            bar.advance(t_all, len(jobs) - len(todo))
            if sample is None:
                sample = make_sample(task, tokenizer, L, seed=seed * 1_000_003 + i)
            bar.update(t_all, description=f"{task} {L}: sample {i} dense prefill ({sample.context_tokens} tokens)")
            dense = None
            first = None
            if any(not j.own_prefill for j in todo):
                dense, logits = dense_prefill(model, sample.input_ids(model.device), prefill_chunk)
                first = logits.argmax(-1, keepdim=True)  # [1, 1] greedy first answer token, shared by every policy
            for j in todo:
                bar.update(t_all, description=f"{task} {L}: sample {i} {j.label} @ {j.budget or 'all'}")
                t0 = time.perf_counter()
                try:
                    pred, mem = _decode(model, tokenizer, sample, j, dense, first)
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    fail(task, L, i, j, e)
                    continue
                row = {
                    "model": model_name, "task": task, "length": L, "policy": j.label, "budget_tokens": j.budget,
                    "score": score_sample(sample, pred), "n": 1, "sample": i, "sample_id": sample.id, "seed": seed,
                    "depth": sample.depth, "context_tokens": sample.context_tokens, "prediction": pred,
                    "answers": list(sample.answers), "seconds": time.perf_counter() - t0,
                    "device_kv_bytes": mem["device_kv"], "cpu_kv_bytes": mem["cpu_kv"],
                    "index_bytes": mem["index"], "policy_config": _policy_for(j, sample).to_config()
                    | ({"prefetch": j.prefetch} if j.prefetch != "off" else {}),
                    "question_hidden": j.hide_question, "first_token": j.first_token,
                    "question_after_compression": j.question_after, "git_sha": sha, "device": str(model.device),
                    "dtype": str(model.dtype).removeprefix("torch."),
                }
                emit(row, f"{100 * row['score']:.0f}")
        for L, i in lg_cells:
            todo = [j for j in lg_jobs if (model_name, LONGGEN, L, i, j.label, j.budget, seed) not in done]
            bar.advance(t_all, len(lg_jobs) - len(todo))
            if not todo:
                continue
            t_tok = bar.add_task(f"{LONGGEN} {L}: sample {i} full cache", total=longgen_tokens)
            lg = longgen_sample(model, tokenizer, L, longgen_tokens, seed=seed * 1_000_003 + i,
                                prefill_chunk=prefill_chunk, step=functools.partial(bar.advance, t_tok))
            if progress and not bar.console.is_terminal:
                bar.console.print(f"{LONGGEN} {L} sample {i}: the full cache generated {longgen_tokens} tokens "
                                  f"({lg.seconds:.1f} s)")
            for j in todo:
                bar.reset(t_tok, description=f"{LONGGEN} {L}: sample {i} {j.label} @ {j.budget or 'all'}")
                try:
                    row = longgen_row(model, lg, j, step=functools.partial(bar.advance, t_tok))
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    fail(LONGGEN, L, i, j, e)
                    continue
                row = {"model": model_name, **row, "sample": i, "seed": seed, "git_sha": sha,
                       "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
                emit(row, f"agreement {100 * row['agreement']:.1f}%, KL {row['kl']:.4f}")
            bar.remove_task(t_tok)
        if fidelity:
            from kvpolicy.eval.fidelity import fidelity_rows

            for L in lengths:
                def skip(j, L=L):
                    return (model_name, "fidelity", L, 0, j.label, j.budget, seed) in done

                bar.update(t_all, description=f"fidelity {L}: capture, perplexity of the full cache")
                for _, row in fidelity_rows(model, tokenizer, jobs, L, n_queries=fidelity_queries,
                                            continuation=continuation, skip=skip):
                    row = {"model": model_name, **row, "sample": 0, "seed": seed, "git_sha": sha,
                           "device": str(model.device)}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    written.append(row)
    model.set_attn_implementation(previous)
    return written
