"""``icecache``: IceCache's page selection (Mao, Wang, Ester, Li, 2026) over a ``dci_tree`` index."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.ops import GQA_MERGES, check_gqa_merge, share_pages, storage_key
from kvpolicy.types import PAD, SearchParams, SelectContext, Selection
from kvpolicy_icecache.rerank import RERANKS, rerank_candidates, rerank_pages

__all__ = ["HEAD_BUDGETS", "RERANKS", "IceCacheSelector"]

HEAD_BUDGETS = ("uniform", "mass")  # how the retrieved pages are shared among the KV heads (IceCacheSelector)


@dataclass(kw_only=True)
class IceCacheSelector(Selector):
    """Head-specific retrieval of the top pages of each KV head from its DCI tree, within the budget.

    The budget is sink + window + retrieved pages (reference: 256 tokens = 2 + 2 + 12 pages of 16, see
    ``Policy.split`` for smaller budgets). Each query head asks the tree for its top pages; the heads of a GQA
    group are merged by interleaving their ranks and keeping the first unique pages (done by the index). Search
    knobs follow the reference decode loop (yuzhenmao/IceCache ``infer_state.py``): field of view
    ``max(fov_ratio * T, min_field_of_view)`` = max(0.0015 T, 30). The reference scans cells with
    ``prop_to_retrieve = 0.8``; here ``prop_to_retrieve``/``prop_to_visit`` default to None, i.e. the index's
    exact cell scan (higher recall, and pruning saves no time in the batched scan: ``docs/icecache.md``).

    Layer reuse (``reuse=True``, preset ``icecache-reuse``): anchor layers ``first_anchor, first_anchor +
    reuse_group, ...`` (reference: 2, 5, 8, ...) search; the next ``reuse_group - 1`` layers reuse the
    anchor's selection while laying out their own K/V in the anchor's pages (``follows_layer``).

    Options beyond the paper (defaults = the paper's configuration, kept as preset ``icecache-paper``):

    * ``gqa_merge``: how a GQA group's query heads share their KV head's pages (``kvpolicy.ops.GQA_MERGES``):
      ``"interleave"`` (the paper: each head ranks, ranks interleaved), ``"max"`` (pages ranked by their best
      score over the group's heads), ``"mean"`` (by the mean over the heads). Passed to the index as
      ``SearchParams.gqa_merge``; the index must list the rule in ``gqa_merges`` (``dci_tree`` and ``exact`` do).
    * ``head_budget``: ``"uniform"`` (the paper: ``k`` retrieved pages per KV head) or ``"mass"``: the row's
      ``Hkv * k`` pages are shared among its KV heads by attention mass (``kvpolicy.ops.share_pages``): each head
      ranks ``max_pages_per_head(k) = ceil(head_budget_max * k)`` candidates and heads whose attention is flat
      over them get more pages, peaked ones fewer (at least one). It needs page scores, so a score-based
      ``gqa_merge`` (``"max"`` or ``"mean"``) or a ``rerank``. The GPU working set holds the per-head cap: ``head_budget_max``
      times the slots of ``"uniform"``, of which ``Hkv * k`` are attended per step.
    * ``rerank``: ``"none"`` (the paper: the index's ranking is the selection), ``"max"`` or ``"mass"``: the index
      is asked for ``ceil(rerank_factor * k)`` candidate pages per KV head, their tokens are scored exactly
      against the GQA group's queries (keys read from the layer's CPU page pool, ``ctx.pool``) and the ``k``
      best candidates by a page score are kept (``kvpolicy_icecache.rerank``): ``"max"``, the page's best
      ``q . k`` over its tokens and the group's heads; ``"mass"``, the page's share of the softmax attention over
      all candidate tokens, summed over the group's heads (the attention oracle's criterion on the candidates).
      ``Selection.scores`` holds that page score. With ``head_budget="mass"`` the re-ranked candidates (the
      per-head cap of them) are shared among the heads by the re-ranked scores. An unlimited budget attends
      every page and is not re-ranked. Reading candidate keys from the host pool makes the step uncapturable
      (``capture_key`` is None) and, on a GPU, costs a host round trip per layer and step: an accuracy option.
    * ``rerank_factor``: candidates per kept page (a number in [1, 64], default 4; 1 re-orders the index's own
      ``k`` pages, which changes nothing attended).
    """

    name: ClassVar[str] = "icecache"
    requires_index: ClassVar[bool] = True
    conformance: ClassVar[dict] = {"index": "dci_tree"}  # the registry-wide conformance sweep runs it on its tree

    fov_ratio: float = 0.0015
    min_field_of_view: int = 30
    prop_to_retrieve: float | None = None
    prop_to_visit: float | None = None
    reuse: bool = False
    first_anchor: int = 2
    reuse_group: int = 3
    gqa_merge: str = "interleave"
    head_budget: str = "uniform"
    head_budget_max: float = 2.0
    rerank: str = "none"
    rerank_factor: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.fov_ratio <= 1:
            raise ValueError(f"fov_ratio must be in [0, 1], got {self.fov_ratio}")
        if self.min_field_of_view < 1:
            raise ValueError(f"min_field_of_view must be >= 1, got {self.min_field_of_view}")
        for f in ("prop_to_retrieve", "prop_to_visit"):
            v = getattr(self, f)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"{f} must be in (0, 1] or None, got {v}")
        if self.first_anchor < 0 or self.reuse_group < 1:
            raise ValueError("first_anchor must be >= 0 and reuse_group >= 1")
        check_gqa_merge(self.gqa_merge, GQA_MERGES, "icecache gqa_merge")
        check_gqa_merge(self.head_budget, HEAD_BUDGETS, "icecache head_budget")
        v = self.head_budget_max
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v <= 16.0:
            raise ValueError(f"head_budget_max must be a number in [1, 16] (pages per head, in units of the uniform "
                             f"share), got {v!r}")
        check_gqa_merge(self.rerank, RERANKS, "icecache rerank")
        v = self.rerank_factor
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v <= 64.0:
            raise ValueError(f"rerank_factor must be a number in [1, 64] (candidate pages per kept page), got {v!r}")
        if self.head_budget == "mass" and self.gqa_merge == "interleave" and self.rerank == "none":
            raise ValueError("icecache head_budget='mass' shares pages by their scores: it needs gqa_merge 'max' or "
                             "'mean' (interleaved ranks carry no score) or a rerank, got gqa_merge='interleave'")
        self._follow_key: tuple | None = None  # a following layer's last capture key (see capture_key)

    def is_anchor(self, layer: int) -> bool:
        return not self.reuse or layer < self.first_anchor or (layer - self.first_anchor) % self.reuse_group == 0

    def follows_layer(self, layer: int) -> int | None:
        if self.is_anchor(layer):
            return None
        return layer - (layer - self.first_anchor) % self.reuse_group

    @property
    def shardable(self) -> bool:  # per-head budgets share a row's pages among its KV heads, which TP spreads over ranks
        return self.head_budget == "uniform"

    def max_pages_per_head(self, k: int) -> int:
        return k if self.head_budget == "uniform" else math.ceil(self.head_budget_max * k)

    def search_params(self, ctx: SelectContext) -> SearchParams:
        base = ctx.search_params or SearchParams()
        fov = base.field_of_view or max(int(self.fov_ratio * ctx.seq_len), self.min_field_of_view)
        return SearchParams(
            field_of_view=fov,
            prop_to_retrieve=base.prop_to_retrieve if base.prop_to_retrieve is not None else self.prop_to_retrieve,
            prop_to_visit=base.prop_to_visit if base.prop_to_visit is not None else self.prop_to_visit,
            gqa_merge=None if self.gqa_merge == "interleave" else self.gqa_merge,
            extra=base.extra,
        )

    def _shares(self, ctx: SelectContext) -> bool:
        """Whether this step shares pages among heads (a limited budget, below the index's pages)."""
        return self.head_budget != "uniform" and ctx.budget.retrieved_pages is not None

    def _reranks(self, ctx: SelectContext) -> bool:
        """Whether this step re-ranks candidates (an option set and a limited budget)."""
        return self.rerank != "none" and ctx.budget.retrieved_pages is not None

    def capture_key(self, ctx: SelectContext) -> tuple | None:
        """Anchor layers whose index search is capturable (the ``dci_tree`` masked search on CUDA), and layers
        that reuse an anchor's selection once it comes from fixed storage: the captured step then reads the
        anchor's ids where the anchor's own captured step writes them. The key names that storage; it must
        repeat from one step to the next before a following layer is captured (an eager anchor hands over a
        fresh tensor at each step)."""
        if not self.is_anchor(ctx.layer):
            prev = ctx.prev_selection
            if prev is None or not prev.page_ids.is_cuda:
                return None
            key = ("icecache-follow", storage_key(prev.page_ids), ctx.k)
            stable, self._follow_key = key == self._follow_key, key
            return key if stable else None
        if self._reranks(ctx):  # reads candidate keys from the host pool: not capturable
            return None
        k = self.max_pages_per_head(ctx.k) if self._shares(ctx) else ctx.k
        key = ctx.index.capture_key(k, self.search_params(ctx))
        return None if key is None else ("icecache", key, self._shares(ctx), float(ctx.scaling))

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        if not self.is_anchor(ctx.layer):
            prev = ctx.prev_selection
            if prev is None:
                raise RuntimeError(
                    f"icecache layer reuse: layer {ctx.layer} follows layer {self.follows_layer(ctx.layer)} "
                    "but no selection of that step reached it (run it through KVPolicyCache)"
                )
            ids = prev.page_ids[..., : self.max_pages_per_head(ctx.k)]
            if ids.is_cuda and torch.cuda.is_current_stream_capturing():
                # recorded into a captured step (capture_key): this layer mirrors its anchor's pages, so the
                # anchor's ids are valid here; the page counts of this step cannot be recorded
                return Selection(page_ids=ids)
            return Selection(page_ids=torch.where(ids < ctx.num_pages.to(ids.device).unsqueeze(-1), ids, PAD))
        if self.gqa_merge not in type(ctx.index).gqa_merges:
            raise ValueError(f"icecache gqa_merge={self.gqa_merge!r} needs an index that merges by scores; index "
                             f"{ctx.index.name!r} supports {', '.join(map(repr, type(ctx.index).gqa_merges))}")
        shares = self._shares(ctx)
        want = self.max_pages_per_head(ctx.k) if shares else ctx.k
        if self._reranks(ctx):
            cand = ctx.index.search(query, rerank_candidates(want, self.rerank_factor), params=self.search_params(ctx))
            ids, scores, units = rerank_pages(query, cand.page_ids, ctx.pool, want, self.rerank, ctx.scaling)
            if not shares:
                return Selection(page_ids=ids, scores=scores)
            return Selection(page_ids=share_pages(ids, units, ctx.k, ctx.scaling))  # [B, Hkv, <= cap]
        if not shares:
            return ctx.index.search(query, ctx.k, params=self.search_params(ctx))
        sel = ctx.index.search(query, want, params=self.search_params(ctx))
        return Selection(page_ids=share_pages(sel.page_ids, sel.scores, ctx.k, ctx.scaling))  # [B, Hkv, <= cap]
