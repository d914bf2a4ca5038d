"""Which tokens become centres: the level of every token, by the reference's deterministic position-ordered
rule (:func:`promotion_levels`) or seeded random promotion (:func:`_random_levels`)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["promotion_levels"]


def promotion_levels(n: int, ratio_1: float, ratio_2: float) -> torch.Tensor:
    """Deterministic, position-ordered promotion of ``n`` tokens -> level of each token ``[n]`` int64 (CPU).

    Same rule as the reference (dci.c ``construct_new_tree`` with ``random=False``, float32 arithmetic as in
    C): the token after the one that satisfies ``count[t] + 1 >= count[t+1] / p_t`` goes to level ``t+1``,
    and the top level opens a new level above once it holds ``ceil(1/p)`` points (``p_0 = ratio_1``,
    ``p_t = ratio_2`` for ``t >= 1``). With (0.01, 0.2), 32 000 tokens give level sizes
    [31603, 317, 64, 13, 3] and the first promoted positions are 100, 102, 202, 303, ...

    The loop runs once per promotion event (about ``ratio_1 * n`` times), jumping over runs of level-0 tokens.
    """
    p = (np.float32(ratio_1), np.float32(ratio_2))

    def prob(t: int) -> np.float32:
        return p[0] if t == 0 else p[1]

    def promo(t: int) -> int:
        return int(np.ceil(np.float32(1.0) / prob(t)))

    counts: list[int] = []
    events_pos: list[int] = []
    events_lvl: list[int] = []
    nxt, pos = 0, 0
    while pos < n:
        t = nxt
        if t == 0 and counts:  # a run of level-0 tokens, up to and including the one that triggers promotion
            c0 = counts[0]
            if len(counts) == 1:
                stop = promo(0) - 1 if c0 <= promo(0) - 1 else None
            else:
                stop = max(c0, math.ceil(float(np.float32(counts[1]) / prob(0))) - 1)
            run = n - pos if stop is None else stop - c0 + 1
            take = min(run, n - pos)
            counts[0] += take
            pos += take
            nxt = 1 if (stop is not None and take == run) else 0
            continue
        if t == len(counts):  # opens a new level
            counts.append(0)
            nxt = 0
        elif t == len(counts) - 1:  # top level
            nxt = t + 1 if counts[t] + 1 == promo(t) else 0
        else:
            nxt = t + 1 if counts[t] + 1 >= float(np.float32(counts[t + 1]) / prob(t)) else 0
        counts[t] += 1
        if t > 0:
            events_pos.append(pos)
            events_lvl.append(t)
        pos += 1
    levels = torch.zeros(n, dtype=torch.int64)
    if events_pos:
        levels[torch.tensor(events_pos)] = torch.tensor(events_lvl)
    return levels


def _random_levels(n: int, ratio_1: float, ratio_2: float, seed: int, max_levels: int = 16) -> torch.Tensor:
    """Random promotion (reference ``random=True``): level 0->1 with probability ratio_1, each further level
    with ratio_2; empty levels are removed. Seeded, so deterministic. -> [n] int64 (CPU)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(n, generator=g) < ratio_1
    more = (torch.rand(n, max_levels - 2, generator=g) < ratio_2).to(torch.int64).cumprod(-1).sum(-1)
    lv = torch.where(first, 1 + more, torch.zeros_like(more))
    present = torch.unique(lv)  # sorted; relabel so that levels are 0..L-1 without gaps
    remap = torch.full((max_levels,), -1, dtype=torch.int64)
    remap[present] = torch.arange(present.numel())
    return remap[lv]
