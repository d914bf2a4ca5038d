"""Conformance suites shipped for plugin authors (pytest).

Subclass one suite per part and set the class attribute; pytest collects the inherited tests::

    from kvpolicy.testing import SelectorConformance

    class TestMine(SelectorConformance):
        selector_cls = Mine

Every built-in part passes them (``tests/test_conformance.py`` sweeps every registered name). Knobs that
differ between parts are class attributes (e.g. ``min_recall`` for approximate indexes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from kvpolicy.interfaces import Index, PageAllocator, Selector, Transfer
from kvpolicy.pool import PagePool
from kvpolicy.types import PAD, PageLayout, Selection

__all__ = [
    "AllocatorConformance",
    "IndexConformance",
    "SelectorConformance",
    "TransferConformance",
    "clustered_keys",
    "layout_pages",
    "exact_page_selection",
    "page_recall",
]


# ---------------------------------------------------------------------------------------------- data
def clustered_keys(B=1, H=2, T=512, D=32, clusters=16, seed=0) -> torch.Tensor:
    """Keys with cluster structure and a few large-norm outliers, like real attention keys. [B, H, T, D]"""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, H, clusters, D, generator=g) * 2.0
    assign = torch.randint(0, clusters, (B, H, T), generator=g)
    keys = centres.gather(2, assign.unsqueeze(-1).expand(B, H, T, D)) + 0.5 * torch.randn(B, H, T, D, generator=g)
    keys[:, :, ::97] *= 3.0
    return keys


def layout_pages(layouts: list[PageLayout]) -> dict[tuple[int, int, int], list[int]]:
    """Replay build + add layouts: (b, h, page) -> sorted token ids (later layouts overwrite pages)."""
    pages: dict[tuple[int, int, int], list[int]] = {}
    for lay in layouts:
        B, H, M = lay.page_ids.shape
        for b in range(B):
            for h in range(H):
                for m in range(M):
                    p = int(lay.page_ids[b, h, m])
                    if p >= 0:
                        pages[(b, h, p)] = sorted(int(t) for t in lay.token_ids[b, h, m] if t >= 0)
    return pages


def exact_page_selection(keys: torch.Tensor, layout: PageLayout, queries: torch.Tensor, k: int) -> Selection:
    """Ground truth for any page layout: pages ranked by their best token's exact q.k, GQA heads merged by
    interleaving ranks (as the indexes do). keys: [B, Hkv, T, D] index-local; layout: a full (build) layout;
    queries: [B, Hq, D] -> Selection [B, Hkv, <=k]."""
    from kvpolicy.ops import gqa_merge, page_max_scores, topk_ids

    B, H, T, D = keys.shape
    G = queries.shape[1] // H
    tok_page = torch.full((B, H, T), PAD, dtype=torch.int64)
    valid = layout.token_ids >= 0  # [B, H, M, S]
    bi = torch.arange(B).view(B, 1, 1, 1).expand_as(layout.token_ids)[valid]
    hi = torch.arange(H).view(1, H, 1, 1).expand_as(layout.token_ids)[valid]
    tok_page[bi, hi, layout.token_ids[valid]] = layout.page_ids.unsqueeze(-1).expand_as(layout.token_ids)[valid]
    scores = torch.einsum("bhgd,bhtd->bhgt", queries.float().view(B, H, G, D), keys.float()).reshape(B, H * G, T)
    tp = tok_page.repeat_interleave(G, dim=1)  # [B, Hq, T]
    ids, _ = topk_ids(page_max_scores(scores, tp, int(layout.num_pages.max())), k)
    return Selection(page_ids=gqa_merge(ids.view(B, H, G, -1), k))


def page_recall(found: Selection, truth: Selection) -> float:
    """Fraction of the true top pages that ``found`` also returns (per row, averaged)."""
    f, t = found.page_ids, truth.page_ids
    hits = ((f.unsqueeze(-1) == t.unsqueeze(-2)) & (t.unsqueeze(-2) >= 0)).any(-2)  # [B, H, Kt]
    denom = (t >= 0).sum()
    return float(hits.sum() / denom) if denom else 1.0


# ---------------------------------------------------------------------------------------------- Index
class _Requires:
    """Skips a suite whose part needs an optional module that is not installed (``Part.requires``)."""

    @pytest.fixture(autouse=True)
    def _optional_modules(self):
        for attr in ("index_cls", "selector_cls", "allocator_cls", "transfer_cls"):
            cls = getattr(self, attr, None)
            if cls is not None:
                for module in cls.requires:
                    pytest.importorskip(module, reason=f"{cls.kind} {cls.name!r} needs {module}")


class IndexConformance(_Requires):
    """Contract of ``Index`` (see ``kvpolicy.interfaces.Index``) plus recall@k against exact search."""

    index_cls: ClassVar[type[Index]]
    index_kwargs: ClassVar[dict[str, Any]] = {}
    page_size: ClassVar[int] = 16
    min_recall: ClassVar[float] = 1.0  # recall@k of search against the exact index on clustered keys
    k: ClassVar[int] = 8

    def make(self) -> Index:
        return self.index_cls(**self.index_kwargs) if self.index_kwargs else self.index_cls.tiny()

    def test_build_puts_every_token_in_exactly_one_page(self):
        keys = clustered_keys(B=2, H=2, T=300)
        idx = self.make()
        lay = idx.build(keys, page_size=self.page_size)
        lay.validate()
        pages = layout_pages([lay])
        for b in range(2):
            for h in range(2):
                toks = sorted(t for (bb, hh, _), ts in pages.items() if (bb, hh) == (b, h) for t in ts)
                assert toks == list(range(300)), "every token in exactly one page"
        assert all(len(ts) <= self.page_size for ts in pages.values())
        assert idx.num_tokens == 300
        assert torch.equal(idx.num_pages, lay.num_pages)
        assert idx.nbytes >= 0

    def test_search_returns_valid_selection(self):
        keys = clustered_keys()
        idx = self.make()
        lay = idx.build(keys, page_size=self.page_size)
        q = torch.randn(1, 4, keys.shape[-1])  # GQA: 2 query heads per KV head
        sel = idx.search(q, self.k)
        sel.validate(lay.num_pages)
        assert sel.page_ids.shape[:2] == (1, 2) and sel.k <= self.k
        everything = idx.search(q, 10_000)
        everything.validate(lay.num_pages)
        assert int((everything.page_ids >= 0).sum(-1).min()) >= min(self.k, int(lay.num_pages.min()))

    def test_search_is_deterministic(self):
        keys = clustered_keys(seed=3)
        q = torch.randn(1, 4, keys.shape[-1], generator=torch.Generator().manual_seed(5))
        a, b = self.make(), self.make()
        a.build(keys, page_size=self.page_size)
        b.build(keys, page_size=self.page_size)
        assert torch.equal(a.search(q, self.k).page_ids, b.search(q, self.k).page_ids)

    def test_recall_against_exact_search(self):
        from kvpolicy.reference.exact_index import ExactIndex

        keys = clustered_keys(T=1024, seed=1)
        idx = self.make()
        lay = idx.build(keys, page_size=self.page_size)
        at = torch.randint(0, 1024, (2, 4), generator=torch.Generator().manual_seed(2))  # 4 tokens per KV head
        q = torch.stack([keys[0, h, at[h]] for h in range(2)]).reshape(1, 8, -1) + 0.1  # [1, Hq=8, D], GQA 4
        found = idx.search(q, self.k)
        truth = exact_page_selection(keys, lay, q, self.k)  # exact search over this index's own pages
        r = page_recall(found, truth)
        assert r >= self.min_recall, f"recall@{self.k} {r:.3f} < {self.min_recall}"
        if self.index_cls is ExactIndex:
            assert r == 1.0

    def test_add_reports_new_and_changed_pages(self):
        idx = self.make()
        keys = clustered_keys(T=200 + 3 * self.page_size, seed=4)
        lay0 = idx.build(keys[:, :, :200], page_size=self.page_size)
        if not idx.supports_add:
            with pytest.raises(NotImplementedError, match=type(idx).__name__):
                idx.add(keys[:, :, 200:])
            return
        layouts = [lay0]
        for i in range(3):
            chunk = keys[:, :, 200 + i * self.page_size : 200 + (i + 1) * self.page_size]
            lay = idx.add(chunk)
            lay.validate()
            layouts.append(lay)
        pages = layout_pages(layouts)
        toks = sorted(t for (b, h, _), ts in pages.items() if h == 0 for t in ts)
        assert toks == list(range(200 + 3 * self.page_size))
        assert idx.num_tokens == 200 + 3 * self.page_size
        sel = idx.search(torch.randn(1, 2, keys.shape[-1]), self.k)
        sel.validate(idx.num_pages)

    def test_empty_build_then_add(self):
        """A prompt shorter than sink + window leaves the index empty at prefill; decoding then adds pages."""
        idx = self.make()
        keys = clustered_keys(T=3 * self.page_size, seed=6)
        lay0 = idx.build(keys[:, :, :0], page_size=self.page_size)
        lay0.validate()
        assert idx.num_tokens == 0
        if not idx.supports_add:
            return
        layouts = [lay0]
        for i in range(3):
            layouts.append(idx.add(keys[:, :, i * self.page_size : (i + 1) * self.page_size]))
            layouts[-1].validate()
        pages = layout_pages(layouts)
        for h in range(keys.shape[1]):
            assert sorted(t for (b, hh, _), ts in pages.items() if hh == h for t in ts) == list(range(keys.shape[2]))
        idx.search(torch.randn(1, 4, keys.shape[-1]), self.k).validate(idx.num_pages)

    def test_bad_input_is_rejected(self):
        idx = self.make()
        with pytest.raises((ValueError, TypeError)):
            idx.build(torch.randn(2, 16, 8), page_size=self.page_size)  # 3-D
        with pytest.raises((ValueError, TypeError)):
            idx.build(torch.randint(0, 3, (1, 1, 16, 8)), page_size=self.page_size)  # integer keys
        idx.build(clustered_keys(), page_size=self.page_size)
        with pytest.raises(ValueError):
            idx.search(torch.randn(1, 3, 32), 4)  # 3 query heads do not divide into 2 KV heads
        with pytest.raises(ValueError):
            idx.search(torch.randn(1, 2, 31), 4)  # wrong head dim

    def test_reset_empties(self):
        idx = self.make()
        idx.build(clustered_keys(), page_size=self.page_size)
        idx.reset()
        assert idx.num_tokens == 0


# ---------------------------------------------------------------------------------------------- Selector
class SelectorConformance(_Requires):
    """Contract of ``Selector`` inside a real ``PolicyLayer`` (budget, validity, determinism, quality)."""

    selector_cls: ClassVar[type[Selector]]
    selector_kwargs: ClassVar[dict[str, Any]] = {}
    index: ClassVar[str] = "exact"
    page_size: ClassVar[int | str] = 16  # or "auto" (chosen from each budget)
    policy_kwargs: ClassVar[dict[str, Any]] = {}  # further Policy fields, e.g. split_tokens
    budgets: ClassVar[tuple[int, ...]] = (64, 128, 256)
    finds_planted_page: ClassVar[bool | None] = None  # None: True for query-aware selectors

    def _policy(self, budget):
        from kvpolicy.policy import Policy
        from kvpolicy.registry import Registry, get_registry

        reg = get_registry()
        if ("selector", self.selector_cls.name) not in reg or reg.get("selector", self.selector_cls.name) is not self.selector_cls:
            reg = Registry()
            reg.register(_single_plugin(self.selector_cls), name=f"conformance-{self.selector_cls.name}")
        return Policy(selector={"name": self.selector_cls.name, **self.selector_kwargs}, index=self.index,
                      page_size=self.page_size, budget=budget, registry=reg, **self.policy_kwargs)

    def _layer(self, budget, keys, values):
        from kvpolicy.layer import PolicyLayer

        layer = PolicyLayer(self._policy(budget), 0, validate=True)
        queries = None
        if self.selector_cls.needs_prompt_queries:  # prompt queries near the keys, GQA 2 like the decode queries
            g = torch.Generator().manual_seed(11)
            queries = keys.repeat_interleave(2, dim=1) + 0.3 * torch.randn(keys.shape[0], 2 * keys.shape[1],
                                                                          *keys.shape[2:], generator=g)
        layer.prefill(keys, values, queries=queries)
        return layer

    def _data(self, T=600, seed=0):
        keys = clustered_keys(B=1, H=2, T=T, D=32, seed=seed)
        values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed + 1))
        return keys, values

    def test_selection_is_valid_within_budget(self):
        keys, values = self._data()
        for budget in (*self.budgets, None):
            layer = self._layer(budget, keys, values)
            ctx = layer.context(scaling=32**-0.5)
            sel = self.selector_cls.select(layer.selector, torch.randn(1, 4, 32), ctx)
            sel.validate(ctx.num_pages)
            assert sel.page_ids.shape[:2] == (1, 2)
            cap = layer.selector.max_pages_per_head(ctx.k)
            assert sel.k <= cap, f"{sel.k} pages selected, budget allows {cap} per head"
            assert int(sel.valid.sum((1, 2)).max()) <= sel.page_ids.shape[1] * ctx.k, "more pages than the row budget"

    def test_decode_steps_run_and_insert_pages(self):
        keys, values = self._data()
        layer = self._layer(self.budgets[0], keys, values)
        g = torch.Generator().manual_seed(7)
        for _ in range(2 * layer.budget.page_size + 1):
            out = layer.decode(torch.randn(1, 4, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g),
                               torch.randn(1, 2, 1, 32, generator=g), scaling=32**-0.5)
            assert out.shape == (1, 4, 32) and torch.isfinite(out).all()
        assert layer.stats.pages_inserted >= 1

    def test_same_input_same_selection(self):
        keys, values = self._data(seed=2)
        q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3))
        sels = []
        for _ in range(2):
            layer = self._layer(self.budgets[0], keys, values)
            sels.append(layer.selector.select(q, layer.context(scaling=32**-0.5)).page_ids)
        assert torch.equal(sels[0], sels[1])

    def test_query_aware_selector_finds_planted_page(self):
        planted = self.finds_planted_page
        if planted is None:
            planted = self.selector_cls.query_aware
        if not planted:
            pytest.skip(f"{self.selector_cls.name} is not expected to find a planted page")
        keys, values = self._data(seed=4)
        q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(9))
        b = self._policy(max(self.budgets)).resolve_budget()
        needle = b.sink_tokens + 5 * b.page_size + 3  # token in the 6th offloaded page
        keys[:, 0, needle] = q[:, 0] / q[:, 0].norm() * 40.0  # one key dominates KV head 0's attention
        layer = self._layer(max(self.budgets), keys, values)
        sel = layer.selector.select(q, layer.context(scaling=32**-0.5))
        page = int(layer.kv.cpu_pool.token_page[0, 0, needle - b.sink_tokens])
        assert page in sel.page_ids[0, 0].tolist()


# ---------------------------------------------------------------------------------------------- Allocator
class AllocatorConformance(_Requires):
    """Contract of ``PageAllocator``: distinct slots, residency, pinning, eviction, invalidation."""

    allocator_cls: ClassVar[type[PageAllocator]]
    allocator_kwargs: ClassVar[dict[str, Any]] = {}

    def make(self, B=2, H=2, N=4) -> PageAllocator:
        a = self.allocator_cls(**self.allocator_kwargs) if self.allocator_kwargs else self.allocator_cls.tiny()
        a.setup(B, H, N, "cpu")
        return a

    @staticmethod
    def sel(rows) -> Selection:
        return Selection(page_ids=torch.tensor(rows, dtype=torch.int64))

    def test_slots_are_distinct_and_in_range(self):
        a = self.make()
        r = a.reserve(self.sel([[[0, 1, 2, PAD], [5, 6, PAD, PAD]], [[3, PAD, PAD, PAD], [0, 1, 2, 3]]]))
        valid = r.page_ids >= 0
        assert torch.equal(r.missing, valid)
        assert bool((r.slots[valid] >= 0).all()) and bool((r.slots[valid] < 4).all())
        assert bool((r.slots[~valid] == PAD).all())
        for b in range(2):
            for h in range(2):
                s = r.slots[b, h][valid[b, h]].tolist()
                assert len(set(s)) == len(s)
        assert torch.equal(a.lookup(r.page_ids), r.slots)
        a.release(r)

    def test_resident_pages_are_not_copied_again(self):
        a = self.make(1, 1, 4)
        r1 = a.reserve(self.sel([[[0, 1, 2]]]))
        a.release(r1)
        r2 = a.reserve(self.sel([[[2, 0, 7]]]))
        assert r2.missing.tolist() == [[[False, False, True]]]
        assert r2.slots[0, 0, 0] == r1.slots[0, 0, 2] and r2.slots[0, 0, 1] == r1.slots[0, 0, 0]
        a.release(r2)

    def test_eviction_never_takes_a_selected_or_pinned_page(self):
        a = self.make(1, 1, 3)
        r1 = a.reserve(self.sel([[[0, 1, 2]]]))
        a.release(r1)
        r2 = a.reserve(self.sel([[[1, 3, 4]]]))
        assert set(r2.evicted[r2.missing].tolist()) <= {0, 2}
        assert 1 not in r2.evicted.tolist()[0][0]
        with pytest.raises((RuntimeError, ValueError)):
            a.reserve(self.sel([[[5, PAD, PAD]]]))  # every slot pinned by r2
        a.release(r2)
        r3 = a.reserve(self.sel([[[5, PAD, PAD]]]))
        assert bool(r3.missing[0, 0, 0])
        a.release(r3)

    def test_more_pages_than_slots_is_an_error(self):
        a = self.make(1, 1, 2)
        with pytest.raises(ValueError, match="slots"):
            a.reserve(self.sel([[[0, 1, 2]]]))

    def test_double_release_is_an_error(self):
        a = self.make(1, 1, 2)
        r = a.reserve(self.sel([[[0, 1]]]))
        a.release(r)
        with pytest.raises(ValueError):
            a.release(r)

    def test_invalidate_forces_a_new_copy(self):
        a = self.make(1, 1, 2)
        a.release(a.reserve(self.sel([[[0, 1]]])))
        a.invalidate(torch.tensor([[[1]]]))
        r = a.reserve(self.sel([[[0, 1]]]))
        assert r.missing.tolist() == [[[False, True]]]
        a.release(r)
        assert int(a.num_free.sum()) == 0

    def test_reset(self):
        a = self.make(1, 1, 2)
        a.release(a.reserve(self.sel([[[0, 1]]])))
        a.reset()
        assert int(a.num_free.sum()) == 2


# ---------------------------------------------------------------------------------------------- Transfer
class TransferConformance(_Requires):
    """Contract of ``Transfer``: bit-exact copies into the right slots, nothing else touched, from a source pool
    held in chunks, in the model's dtype and in fp8 (the slots then hold what ``PagePool.read_pages`` reads)."""

    transfer_cls: ClassVar[type[Transfer]]
    transfer_kwargs: ClassVar[dict[str, Any]] = {}
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)

    def make(self) -> Transfer:
        return self.transfer_cls(**self.transfer_kwargs) if self.transfer_kwargs else self.transfer_cls.tiny()

    def _pools(self, dtype, dst_device="cpu", pool_dtype="auto"):
        """A CPU source pool of 12 pages per row in 4 chunks (in ``dtype``, or fp8 with random per-page scales) and a
        slot pool of 4 slots filled with -7."""
        g = torch.Generator().manual_seed(0)
        src = PagePool(2, 3, 16, 8, dtype=dtype, capacity=10, chunk_pages=3, pool_dtype=pool_dtype)
        for c in src.k_chunks + src.v_chunks:
            c.copy_(torch.randn(c.shape, generator=g).to(c.dtype))
        if src.fp8:
            src.k_scale.copy_(torch.rand(src.k_scale.shape, generator=g))
            src.v_scale.copy_(torch.rand(src.v_scale.shape, generator=g))
        src.lengths.copy_(torch.randint(1, 17, src.lengths.shape, generator=g).to(torch.int32))
        dst = PagePool(2, 3, 16, 8, dtype=dtype, device=dst_device, capacity=4, pin=False, track_tokens=False)
        dst.k.fill_(-7)
        dst.v.fill_(-7)
        return src, dst

    def _check(self, dst_device):
        for dtype, pool_dtype in [(d, p) for d in self.dtypes for p in ("auto", "fp8")]:
            src, dst = self._pools(dtype, dst_device, pool_dtype)
            ids = torch.tensor([[[3, 9, PAD], [0, PAD, PAD], [PAD, PAD, PAD]],
                                [[1, 2, 4], [7, PAD, 5], [6, PAD, PAD]]])
            slots = torch.tensor([[[1, 0, PAD], [3, PAD, PAD], [PAD, PAD, PAD]],
                                  [[0, 1, 2], [2, PAD, 0], [3, PAD, PAD]]])
            t = self.make()
            h = t.submit(src, ids, dst, slots)
            t.wait(h)
            assert h.num_pages == int((ids >= 0).sum())
            written = torch.zeros(2, 3, 4, dtype=torch.bool)
            for b, hh, j in (ids >= 0).nonzero().tolist():
                p, s = int(ids[b, hh, j]), int(slots[b, hh, j])
                written[b, hh, s] = True
                k, v = src.read_pages(torch.tensor([b * 3 + hh]), torch.tensor([p]))  # [1, S, D] (dequantised)
                assert torch.equal(dst.k[b, hh, s].cpu(), k[0]), f"K copied bit-exactly ({pool_dtype} pool)"
                assert torch.equal(dst.v[b, hh, s].cpu(), v[0]), f"V copied bit-exactly ({pool_dtype} pool)"
                assert int(dst.lengths[b, hh, s]) == int(src.lengths[b, hh, p])
            assert bool((dst.k.cpu()[~written] == -7).all()), "slots not addressed stay untouched"

    def test_copies_are_bit_exact(self):
        self._check("cpu")

    @pytest.mark.cuda
    def test_copies_to_cuda_are_bit_exact(self):
        self._check("cuda")

    def test_bad_arguments_are_rejected(self):
        src, dst = self._pools(torch.float32)
        t = self.make()
        with pytest.raises(ValueError):
            t.submit(src, torch.zeros(2, 3, 2, dtype=torch.long), dst, torch.zeros(2, 3, 3, dtype=torch.long))
        with pytest.raises(ValueError):
            t.submit(src, torch.zeros(2, 3, 1, dtype=torch.long), dst, torch.full((2, 3, 1), 9))  # slot >= 4
        other = PagePool(2, 3, 16, 8, dtype=torch.float16, capacity=4, track_tokens=False)
        with pytest.raises(ValueError, match="dtype"):
            t.submit(src, torch.zeros(2, 3, 1, dtype=torch.long), other, torch.zeros(2, 3, 1, dtype=torch.long))


def _single_plugin(cls: type) -> Any:
    """An in-process plugin object registering one part class of any kind (for classes not installed as
    plugins): ``Registry().register(_single_plugin(MyIndex))``."""
    from kvpolicy.hookspecs import hookimpl

    hook = {"index": "indexes", "selector": "selectors", "allocator": "allocators", "transfer": "transfers"}[cls.kind]

    class _Plugin:
        pass

    setattr(_Plugin, f"kvpolicy_register_{hook}", hookimpl(lambda self: [cls]))
    return _Plugin()
