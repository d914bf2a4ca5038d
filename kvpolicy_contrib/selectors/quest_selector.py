"""``quest``: Quest (Tang et al., ICML 2024): query-aware page selection by per-page min/max key bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy_contrib.selectors._digests import DigestSelector, PageDigests, box_upper_bound

__all__ = ["QuestSelector"]


@dataclass(kw_only=True)
class QuestSelector(DigestSelector):
    """Each page keeps the element-wise minimum and maximum of its keys; a page's score for query ``q`` is the
    upper bound of ``q . k`` over that box, ``sum_d max(q_d min_d, q_d max_d)``, and the top pages are loaded.

    Defaults (preset ``quest``) follow the paper: pages of 16 tokens, positional pages, the first two layers
    dense ("Quest is not applied to the first two layers"). Deviations: GQA, which the paper's models lacked,
    is handled as for every kvpolicy selector (each query head ranks, the group's rankings are interleaved);
    the budget counts sink and window pages, which Quest does not keep separately.
    """

    name: ClassVar[str] = "quest"

    def score(self, q: torch.Tensor, d: PageDigests, P: int) -> torch.Tensor:
        return box_upper_bound(q, d, P)
