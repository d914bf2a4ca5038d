"""``kvpolicy eval``: task accuracy per (task, length, policy, budget) on a real model, resumable.

For every sample the prompt's prefill runs **once**, densely, with the greedy first answer token; every policy
whose selector does not score the prompt then decodes the rest of the answer from that prefill
(``KVPolicyCache.from_dense``: the K/V really move to CPU pages). Policies that score the prompt at prefill
(``needs_prompt_queries``: SnapKV, H2O) run their own prefill through the cache. SnapKV runs twice, with the
question visible to its observation window (``snapkv``) and hidden from it (``snapkv-qhidden``: the window ends
before the question).

One JSON object per (sample, policy, budget) is appended to ``out`` as soon as it is known, so a run that stops
can be resumed: rows already in the file (same model, task, length, sample, policy, budget, seed) are skipped;
error rows of failed cells are tried again and replaced (``kvpolicy.eval.results_file``).
``kvpolicy report`` aggregates rows into tables and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

__all__ = ["EvalJob", "QHIDDEN_SUFFIX", "eval_jobs", "read_rows", "row_key", "run_eval"]

QHIDDEN_SUFFIX = "-qhidden"
REQUIRED_KEYS = ("model", "task", "length", "policy", "budget_tokens", "score", "n")


@dataclass(frozen=True, eq=False)
class EvalJob:
    """One (policy, budget) cell; ``policy`` is resolved, ``label`` is what rows call it."""

    label: str
    budget: int | None
    policy: Policy
    hide_question: bool = False
    prefetch: str = "off"  # KVPolicyCache(prefetch=...): a "+prefetch"/"+estimate" suffix, kept in the label

    @property
    def own_prefill(self) -> bool:
        return self.policy.selector_cls.needs_prompt_queries


def eval_jobs(policies: Sequence[str], budgets: Sequence[int], cpu_pool_dtype: str | None = None) -> list[EvalJob]:
    """Every (policy, budget); policies that read every page (``full``) once, unlimited; ``snapkv`` also with the
    question hidden. A name may carry a placement, ``NAME[@INDEX_DEVICE][:TRANSFER]`` (``icecache@cuda:uva``):
    it changes where the work runs, not the rows' policy label (the placement is in ``policy_config``).
    ``cpu_pool_dtype`` (``None``: each policy's own, ``"auto"`` unless it says otherwise) sets how every policy's
    CPU pages are stored; fp8 changes the results, so those labels end in ``+fp8`` (``icecache+fp8``: rows of both
    can share a file and be compared with ``report --compare icecache,icecache+fp8``).
    Unknown names, bad budgets and one policy placed twice fail here, before any model work."""
    if cpu_pool_dtype is not None:
        check_pool_dtype(cpu_pool_dtype)
    jobs: list[EvalJob] = []
    seen: dict[str, str] = {}
    for spec in policies:
        placed, prefetch = split_prefetch(spec)
        name, index_device, transfer = split_placement(placed)
        suffix = spec[len(placed):]  # the prefetch mode changes the results (estimate): it is part of the label
        if name + suffix in seen:
            raise ValueError(f"policy {name!r} is listed twice ({seen[name + suffix]!r} and {spec!r}); rows are keyed "
                             "by name")
        seen[name + suffix] = spec
        hidden = name.endswith(QHIDDEN_SUFFIX)
        base = Policy.resolve(name[: -len(QHIDDEN_SUFFIX)] if hidden else name).placed(index_device, transfer)
        if cpu_pool_dtype is not None:
            base = dataclasses.replace(base, cpu_pool_dtype=cpu_pool_dtype)
        tag = "" if base.cpu_pool_dtype == "auto" else f"+{base.cpu_pool_dtype}"
        suffix += tag
        if hidden and not base.selector_cls.needs_prompt_queries:
            raise ValueError(f"{name!r}: only prefill-scoring selectors (snapkv, h2o) have a question-hidden mode")
        if not base.selector_cls.uses_budget:
            jobs.append(EvalJob(name + suffix, None, base.with_budget(None), prefetch=prefetch))
            continue
        for b in budgets:
            jobs.append(EvalJob(name + suffix, b, base.with_budget(b), hidden, prefetch))
        if base.selector.name == "snapkv" and not hidden and not any(
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


@torch.inference_mode()
def _decode(model, tokenizer, sample: TaskSample, job: EvalJob, dense, first) -> tuple[str, dict[str, int]]:
    ids = sample.input_ids(model.device)
    pol = _policy_for(job, sample)
    n = sample.max_new_tokens
    if job.own_prefill:  # the selector scores the prompt: its prefill runs through the cache
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
) -> list[dict[str, Any]]:
    """Run the grid and append rows to ``out``; return the rows written now. ``samples_source`` replaces the
    generated samples (``--task-file``): then ``tasks``/``lengths``/``samples`` are ignored. ``fidelity`` adds,
    per length, one row per (policy, budget) of attention fidelity and perplexity on the essays
    (``kvpolicy.eval.fidelity``). ``prefill_chunk`` streams the shared dense prefill, that many tokens per forward
    (exact: the same rows, less activation memory). ``cpu_pool_dtype="fp8"``: every policy's CPU pages in fp8, rows
    labelled ``NAME+fp8`` (``eval_jobs``). Cells that fail are written as rows with an ``error`` (and
    appended to ``failed``); a rerun tries them again and replaces those rows. An advisory lock on ``out`` refuses
    a second concurrent writer (``ResultsLockedError``). A sample whose prompt plus answer tokens exceed the
    model's maximum position is a ``ContextLengthError`` before any model work, unless ``allow_overflow``."""
    from rich.progress import Progress
    from transformers import DynamicCache

    jobs = eval_jobs(policies, budgets, cpu_pool_dtype)
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
    retried = lambda r: "error" in r and row_key(r) in planned  # noqa: E731  (a rerun replaces its error rows)
    with open_results(out, drop=retried) as f, Progress(disable=not progress) as bar:
        done = {row_key(r) for r in read_rows(out) if "error" not in r}  # failed cells are tried again
        t_all = bar.add_task("eval", total=len(units) * len(jobs))
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
                with torch.inference_mode():
                    dense = DynamicCache(config=model.config)
                    # logits of the last position only: the whole prompt's would be T x vocab floats (10 GB for
                    # 16k tokens of Qwen2.5 in float32, which once ran this CPU out of memory)
                    # streamed: under the kvpolicy attention (no mask over earlier chunks)
                    with policy_attention(model) if prefill_chunk else contextlib.nullcontext():
                        logits = prefill(model, dense, sample.input_ids(model.device), prefill_chunk)
                    first = logits.argmax(-1, keepdim=True)  # [1, 1] greedy first answer token, shared by every policy
            for j in todo:
                bar.update(t_all, description=f"{task} {L}: sample {i} {j.label} @ {j.budget or 'all'}")
                t0 = time.perf_counter()
                try:
                    pred, mem = _decode(model, tokenizer, sample, j, dense, first)
                except (RuntimeError, ValueError, NotImplementedError) as e:  # one cell fails, the grid goes on
                    bar.console.print(f"[red]{task} {L} sample {i} {j.label} @ {j.budget}: {type(e).__name__}: {e}")
                    row = {"model": model_name, "task": task, "length": L, "policy": j.label, "sample": i,
                           "budget_tokens": j.budget, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    if failed is not None:
                        failed.append(row)
                    bar.advance(t_all)
                    continue
                row = {
                    "model": model_name, "task": task, "length": L, "policy": j.label, "budget_tokens": j.budget,
                    "score": score_sample(sample, pred), "n": 1, "sample": i, "sample_id": sample.id, "seed": seed,
                    "depth": sample.depth, "context_tokens": sample.context_tokens, "prediction": pred,
                    "answers": list(sample.answers), "seconds": time.perf_counter() - t0,
                    "device_kv_bytes": mem["device_kv"], "cpu_kv_bytes": mem["cpu_kv"],
                    "index_bytes": mem["index"], "policy_config": _policy_for(j, sample).to_config()
                    | ({"prefetch": j.prefetch} if j.prefetch != "off" else {}),
                    "question_hidden": j.hide_question, "git_sha": sha, "device": str(model.device),
                    "dtype": str(model.dtype).removeprefix("torch."),
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                written.append(row)
                bar.advance(t_all)
                if progress and not bar.console.is_terminal:  # a log, not a live bar: one line per row
                    done_n = int(bar.tasks[0].completed)
                    bar.console.print(f"[{done_n}/{len(units) * len(jobs)}] {task} {L} sample {i} {j.label} @ "
                                      f"{j.budget or 'all'}: {100 * row['score']:.0f} ({row['seconds']:.1f} s)")
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
