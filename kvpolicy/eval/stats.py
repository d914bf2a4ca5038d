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

__all__ = ["BOOTSTRAP_SEED", "BOOTSTRAPS", "Interval", "Paired", "bootstrap_mean", "paired_comparison",
           "row_score"]

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

    keys = {k[:-1] for name in (a, b) for k in by[name]}
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
