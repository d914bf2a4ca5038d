"""Statistics for ``kvpolicy report``: bootstrap intervals of cell means and paired policy comparisons.

Pure functions over plain numbers (numpy only). A cell's score is the mean over its tasks of each task's mean
over samples; its interval resamples samples with replacement within each task (a stratified bootstrap), so a
task with more samples does not weigh more. A paired comparison takes, for two policies, the score difference
on the same (model, length, task, seed, sample, budget) keys and bootstraps the mean difference the same way.
Every bootstrap uses its own generator seeded with ``seed``, so the output is reproducible and does not depend on
the order cells are computed in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BOOTSTRAP_SEED", "BOOTSTRAPS", "Interval", "Paired", "Split", "bootstrap_mean", "chain_split",
           "paired_comparison", "row_score"]

BOOTSTRAP_SEED = 0
BOOTSTRAPS = 2000


@dataclass(frozen=True)
class Interval:
    """Mean with a bootstrap interval; ``n`` is the number of samples (the smallest over tasks)."""

    mean: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class Paired:
    """``a`` vs ``b`` on shared keys: counts of a > b, a == b, a < b and the interval of mean(a - b)."""

    a: str
    b: str
    wins: int
    ties: int
    losses: int
    diff: Interval

    @property
    def pairs(self) -> int:
        return self.wins + self.ties + self.losses


@dataclass(frozen=True)
class Split:
    """A gap split along a chain of policies (e.g. full, token oracle, page oracle, a policy) on the samples every
    one of them scored: each policy's mean, each step ``names[i] - names[i + 1]`` and the total ``names[0] -
    names[-1]``, with 95% bootstrap intervals. The step means add up to the total's mean."""

    names: tuple[str, ...]
    pairs: int  # (task, sample) keys scored by every name
    scores: tuple[Interval, ...]
    steps: tuple[Interval, ...]
    total: Interval


def row_score(row: Mapping[str, Any]) -> float:
    """The score a row contributes (as ``report.aggregate`` counts it)."""
    return float(row["score"]) * row.get("n", 1)


def bootstrap_mean(groups: Mapping[Any, Sequence[float]] | Sequence[float], *, level: float = 0.95,
                   n_boot: int = BOOTSTRAPS, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean over groups (tasks) of each group's mean, with a percentile bootstrap interval that resamples the
    values within each group. A plain sequence is one group. Empty groups are ignored; a group of one value
    (or a constant group) adds no width."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    seqs = [groups] if not isinstance(groups, Mapping) else [groups[k] for k in groups]
    arrays = [np.asarray(v, dtype=float) for v in seqs if len(v)]
    if not arrays:
        raise ValueError("no values to average")
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for a in arrays:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        boots += a[idx].mean(axis=1)
    boots /= len(arrays)
    mean = float(np.mean([a.mean() for a in arrays]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    # the point estimate always lies in its interval (float round-off in the bootstrap means aside)
    return Interval(mean, float(min(lo, mean)), float(max(hi, mean)), min(len(a) for a in arrays))


def _sample_key(r: Mapping[str, Any]) -> tuple:
    return (r["model"], r["length"], r["task"], r.get("seed", 0), r.get("sample", 0))


def paired_comparison(rows: Sequence[Mapping[str, Any]], a: str, b: str, **kw: Any) -> dict[tuple, Paired]:
    """(model, length, budget) -> ``a`` vs ``b`` on the samples both scored at that budget. A policy with only
    unlimited rows (``budget_tokens`` None, e.g. ``full``) is paired with every budget of the other. Raises
    ValueError naming the policies present if ``a`` or ``b`` has no scored row, or if they share no sample."""
    scored = [r for r in rows if "score" in r]
    present = list(dict.fromkeys(r["policy"] for r in scored))
    for name in (a, b):
        if name not in present:
            raise ValueError(f"--compare: policy {name!r} has no scored rows; policies in the rows: "
                             f"{', '.join(present) or 'none'}")
    by: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for r in scored:
        if r["policy"] in by:
            by[r["policy"]][(*_sample_key(r), r["budget_tokens"])] = row_score(r)

    def budgets(name):
        return {k[-1] for k in by[name]}

    def at(name, key, budget):
        d = by[name]
        return d.get((*key, budget), d.get((*key, None)) if budgets(name) == {None} else None)

    # sorted: a set of string keys iterates in an order that changes with Python's hash seed, and the bootstrap
    # resamples positions, so an unsorted order gave other intervals on every run
    keys = sorted({k[:-1] for name in (a, b) for k in by[name]}, key=repr)
    all_budgets = sorted(budgets(a) | budgets(b), key=lambda x: (x is None, x or 0))
    if len(all_budgets) > 1:
        all_budgets = [x for x in all_budgets if x is not None] if None not in budgets(a) & budgets(b) else all_budgets
    diffs: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key in keys:
        for budget in all_budgets:
            sa, sb = at(a, key, budget), at(b, key, budget)
            if sa is not None and sb is not None:
                diffs[(key[0], key[1], budget)][key[2]].append(sa - sb)
    if not diffs:
        raise ValueError(f"--compare: {a!r} and {b!r} share no (task, length, sample, budget)")
    out = {}
    for cell, per_task in sorted(diffs.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] is None, x[0][2] or 0)):
        d = np.concatenate([np.asarray(v) for v in per_task.values()])
        out[cell] = Paired(a, b, int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum()),
                           bootstrap_mean(per_task, **kw))
    return out


def chain_split(rows: Sequence[Mapping[str, Any]], names: Sequence[str], *, budgets: Sequence[int] | None = None,
                **kw: Any) -> dict[tuple, Split]:
    """(model, length, budget) -> the gap from ``names[0]`` to ``names[-1]`` split into the steps between
    consecutive names, on the (task, seed, sample) keys that every name scored at that budget. The budgets are
    those of the last name (``budgets`` keeps some); a name with only unlimited rows (``full``) counts at every
    budget, as in ``paired_comparison``. Differences are bootstrapped like a paired comparison (pairs resampled
    within each task, the same seed for every step). Raises ValueError naming the policies present if a name has
    no scored row; a budget whose keys no name shares with the others is left out."""
    if len(names) < 2:
        raise ValueError(f"a split needs at least two policies, got {list(names)}")
    scored = [r for r in rows if "score" in r]
    present = list(dict.fromkeys(r["policy"] for r in scored))
    for name in names:
        if name not in present:
            raise ValueError(f"--split: policy {name!r} has no scored rows; policies in the rows: "
                             f"{', '.join(present) or 'none'}")
    by: dict[str, dict[tuple, float]] = {n: {} for n in names}
    for r in scored:
        if r["policy"] in by:
            by[r["policy"]][(*_sample_key(r), r["budget_tokens"])] = row_score(r)
    unlimited_only = {n for n in names if {k[-1] for k in by[n]} == {None}}
    last = names[-1]
    cells = sorted({(k[0], k[1], k[-1]) for k in by[last]}, key=lambda c: (c[0], c[1], c[2] is None, c[2] or 0))
    out: dict[tuple, Split] = {}
    for model, length, budget in cells:
        if budgets is not None and budget not in budgets:
            continue

        def at(name, key, model=model, length=length, budget=budget):
            return by[name].get((*key, None if name in unlimited_only else budget))

        keys = sorted({k[:-1] for k in by[last] if k[0] == model and k[1] == length and k[-1] == budget},
                      key=lambda k: (k[2], k[3], k[4]))
        keys = [k for k in keys if all(at(n, k) is not None for n in names)]
        if not keys:
            continue
        vals = {n: defaultdict(list) for n in names}
        for k in keys:
            for n in names:
                vals[n][k[2]].append(at(n, k))

        def diff(a, b, vals=vals):
            return {t: [x - y for x, y in zip(vals[a][t], vals[b][t])] for t in vals[a]}

        out[(model, length, budget)] = Split(
            names=tuple(names), pairs=len(keys),
            scores=tuple(bootstrap_mean(vals[n], **kw) for n in names),
            steps=tuple(bootstrap_mean(diff(a, b), **kw) for a, b in zip(names, names[1:])),
            total=bootstrap_mean(diff(names[0], names[-1]), **kw))
    return out
