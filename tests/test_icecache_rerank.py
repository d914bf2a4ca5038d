"""``IceCacheSelector(rerank=...)``: candidate pages re-chosen by their tokens' exact scores (issue 22, item 3)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.layer import PolicyLayer
from kvpolicy.ops import rank_group_pages
from kvpolicy.policy import Policy
from kvpolicy.pool import PagePool
from kvpolicy.reference.oracle_selector import OracleSelector
from kvpolicy.registry import get_registry
from kvpolicy.testing import SelectorConformance, clustered_keys
from kvpolicy.types import PageLayout, SearchParams
from kvpolicy_icecache.icecache_selector import IceCacheSelector
from kvpolicy_icecache.rerank import RERANKS, rerank_candidates, rerank_pages

# ------------------------------------------------------------------------------------ conformance of every variant
_VARIANTS = {
    "max": {"rerank": "max"},
    "mass": {"rerank": "mass"},
    "mass_factor1": {"rerank": "mass", "rerank_factor": 1},
    "mass_headbudget": {"rerank": "mass", "head_budget": "mass"},
    "max_reuse": {"rerank": "max", "reuse": True, "first_anchor": 0},
}
for _tag, _kw in _VARIANTS.items():
    globals()[f"TestConformance_rerank_{_tag}"] = type(
        f"TestConformance_rerank_{_tag}", (SelectorConformance,),
        {"selector_cls": IceCacheSelector, "index": "dci_tree", "selector_kwargs": _kw})


# ------------------------------------------------------------------------------------ validation
def test_unknown_rerank_lists_the_valid_ones():
    assert RERANKS == ("none", "max", "mass")
    with pytest.raises(ValueError, match="rerank must be one of 'none', 'max', 'mass', got 'sum'"):
        IceCacheSelector(rerank="sum")
    with pytest.raises(ValueError, match="'none', 'max', 'mass'"):  # through a policy config, before model work
        Policy.from_config({"preset": "icecache", "selector": {"name": "icecache", "rerank": "topk"}})
    for bad in (0.5, 65, True, "4"):
        with pytest.raises(ValueError, match="rerank_factor"):
            IceCacheSelector(rerank="mass", rerank_factor=bad)
    with pytest.raises(ValueError, match="rule must be one of 'max', 'mass'"):
        rerank_pages(torch.randn(1, 2, 4), torch.zeros(1, 1, 1, dtype=torch.int64), _pool([[4]]), 1, "none")


def test_rerank_lets_per_head_budgets_use_interleaved_ranks():
    IceCacheSelector(rerank="max", head_budget="mass")  # scores come from the re-ranking
    with pytest.raises(ValueError, match="needs gqa_merge"):
        IceCacheSelector(head_budget="mass")


def test_candidates():
    assert [rerank_candidates(k, 4.0) for k in (0, 1, 2, 12)] == [0, 4, 8, 48]
    assert [rerank_candidates(k, 1.5) for k in (1, 2, 3)] == [2, 3, 5]
    assert rerank_candidates(5, 1.0) == 5


# ------------------------------------------------------------------------------------ the page scores
def _pool(lengths, S=4, D=4, keys=None):
    """A CPU pool of one batch row with len(lengths) KV heads (the same number of tokens each), page p of head h
    holding lengths[h][p] tokens; ``keys`` [1, H, P, S, D] gives each page slot's key."""
    H, P = len(lengths), max(len(r) for r in lengths)
    n = sum(lengths[0])
    assert all(sum(r) == n for r in lengths)
    pool = PagePool(1, H, S, D, dtype=torch.float32, capacity=P)
    k = torch.zeros(1, H, P, S, D) if keys is None else keys
    ids = torch.full((1, H, P, S), -1, dtype=torch.int64)
    tok = torch.zeros(1, H, n, D)
    for h, row in enumerate(lengths):
        t = 0
        for p, L in enumerate(row):
            ids[0, h, p, :L] = torch.arange(t, t + L)
            tok[0, h, t:t + L] = k[0, h, p, :L]
            t += L
    lens = torch.tensor(lengths, dtype=torch.int32)[None]
    pool.write(PageLayout(page_ids=torch.arange(P).expand(1, H, P).clone(), token_ids=ids, lengths=lens,
                          num_pages=torch.full((1, H), P), num_tokens=n), tok, torch.zeros_like(tok), 0)
    return pool


def test_mass_prefers_many_relevant_tokens_and_max_the_spike():
    # head 0, D = 4, query e0: page 0 holds one key of score 5 and three of -20; page 1 four keys of score 4
    k = torch.zeros(1, 1, 3, 4, 4)
    k[0, 0, 0, 0, 0], k[0, 0, 0, 1:, 0] = 5.0, -20.0
    k[0, 0, 1, :, 0] = 4.0
    k[0, 0, 2, :, 0] = -30.0
    pool = _pool([[4, 4, 4]], keys=k)
    q = torch.zeros(1, 1, 4)
    q[0, 0, 0] = 1.0
    cand = torch.tensor([[[2, 0, 1]]])
    ids, scores, units = rerank_pages(q, cand, pool, 1, "max")
    assert ids.tolist() == [[[0]]] and scores.tolist() == [[[5.0]]] and units.tolist() == [[[5.0]]]
    ids, scores, units = rerank_pages(q, cand, pool, 2, "mass")
    assert ids.tolist() == [[[1, 0]]]
    z = 4 * torch.e**4 + torch.e**5  # the softmax runs over the candidates' tokens (others negligible)
    assert torch.allclose(scores, torch.tensor([[[4 * torch.e**4 / z, torch.e**5 / z]]]), rtol=1e-4)
    assert torch.allclose(units, scores.log())  # scaling 1: log of the share


def test_short_pages_and_padding_are_masked():
    k = torch.zeros(1, 1, 2, 4, 4)
    k[0, 0, 0, 3, 0] = 100.0  # beyond page 0's 2 valid tokens: must not count
    k[0, 0, 1, 0, 0] = 1.0
    pool = _pool([[2, 4]], keys=k)
    q = torch.zeros(1, 1, 4)
    q[0, 0, 0] = 1.0
    for rule in ("max", "mass"):
        ids, scores, units = rerank_pages(q, torch.tensor([[[0, -1, 1]]]), pool, 3, rule)
        assert ids.tolist() == [[[1, 0, -1]]], rule
        assert bool(torch.isneginf(scores[0, 0, 2])) and bool(torch.isneginf(units[0, 0, 2]))
    ids, _, _ = rerank_pages(q, torch.full((1, 1, 2), -1), pool, 1, "mass")
    assert ids.tolist() == [[[-1]]]


def _layer(rerank, budget=128, factor=64.0, seed=0, **kw):
    keys = clustered_keys(B=1, H=2, T=600, D=32, seed=seed)
    pol = Policy(selector={"name": "icecache", "rerank": rerank, "rerank_factor": factor, **kw}, index="dci_tree",
                 budget=budget)
    layer = PolicyLayer(pol, 0, validate=True)
    layer.prefill(keys, torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return layer, keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mass_over_every_page_is_the_attention_oracle(seed):
    layer, _ = _layer("mass", seed=seed)  # 64 x k candidates: every page of the tree
    ctx = layer.context(scaling=32**-0.5)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed + 10))
    sel = layer.selector.select(q, ctx)
    ref = OracleSelector().select(q, ctx)
    assert torch.equal(sel.page_ids, ref.page_ids)
    assert torch.allclose(sel.scores, ref.scores, rtol=1e-4)


def test_max_over_every_page_is_the_group_max_ranking():
    layer, _ = _layer("max", seed=3)
    ctx = layer.context(scaling=32**-0.5)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(4))
    sel = layer.selector.select(q, ctx)
    pool, P = ctx.pool, int(ctx.num_pages.max())
    keys = pool.read_range(0, P, dtype=torch.float32)[0]  # [1, 2, P, S, D] every page of the tree
    logits = torch.einsum("bhgd,bhpsd->bhgps", q.view(1, 2, 2, 32), keys)
    valid = torch.arange(pool.page_size) < pool.lengths[:, :, :P].unsqueeze(-1)  # [1, 2, P, S]
    ps = logits.masked_fill(~valid.unsqueeze(2), float("-inf")).amax(-1)  # [1, 2, G, P] page max per query head
    ids, vals = rank_group_pages(ps, ctx.k, "max")
    assert torch.equal(sel.page_ids, ids) and torch.allclose(sel.scores, vals, atol=1e-4)
    # and the exact group-max ranking is what the index itself returns under gqa_merge='max' with every page scanned
    full = layer.index.search(q, ctx.k, params=SearchParams(field_of_view=10**6, gqa_merge="max"))
    assert torch.equal(full.page_ids, ids)


def test_selection_comes_from_the_index_candidates():
    for rule in ("max", "mass"):
        layer, _ = _layer(rule, budget=64, factor=2.0)
        ctx = layer.context(scaling=32**-0.5)
        sel_params = layer.selector.search_params(ctx)
        for s in range(5):
            q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(s))
            sel = layer.selector.select(q, ctx)
            cand = layer.index.search(q, 2 * ctx.k, params=sel_params)
            assert sel.k == ctx.k
            for h in range(2):
                got = set(sel.page_ids[0, h].tolist()) - {-1}
                assert got <= set(cand.page_ids[0, h].tolist()) and len(got) == ctx.k


def test_factor_one_keeps_the_index_pages_and_none_is_the_index():
    layer, _ = _layer("mass", budget=64, factor=1.0)
    plain, _ = _layer("none", budget=64)
    for s in range(3):
        q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(s))
        a = layer.selector.select(q, layer.context(scaling=32**-0.5)).page_ids
        b = plain.selector.select(q, plain.context(scaling=32**-0.5)).page_ids
        assert a.sort(-1).values.tolist() == b.sort(-1).values.tolist()  # same pages, re-ordered at most


def test_rerank_changes_selections_on_clustered_keys():
    """Not a no-op: with 4x candidates, mass re-ranking picks other pages than the index for some queries, and
    captures at least as much exact attention mass on average."""
    layer, _ = _layer("mass", budget=64, factor=4.0, seed=5)
    plain, _ = _layer("none", budget=64, seed=5)
    ctx, pctx = layer.context(scaling=32**-0.5), plain.context(scaling=32**-0.5)
    from kvpolicy.reference.oracle_selector import page_attention_mass

    differ, gain = 0, 0.0
    for s in range(20):
        q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(100 + s)) * 2
        a = layer.selector.select(q, ctx).page_ids
        b = plain.selector.select(q, pctx).page_ids
        mass = page_attention_mass(q, ctx).clamp(min=0)
        def got(ids, mass=mass):
            return float(mass.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0).sum())

        differ += int(not torch.equal(a.sort(-1).values, b.sort(-1).values))
        gain += got(a) - got(b)
    assert differ >= 1 and gain >= 0


def test_unlimited_budget_is_not_reranked_and_capture_key():
    layer, _ = _layer("mass", budget=None)
    ctx = layer.context(scaling=32**-0.5)
    sel = layer.selector.select(torch.randn(1, 4, 32), ctx)
    assert int(sel.valid.sum()) == int(ctx.num_pages.sum())
    small, _ = _layer("mass", budget=64)
    assert small.selector.capture_key(small.context()) is None


def test_per_head_budget_with_rerank_holds_the_total():
    layer, _ = _layer("mass", budget=128, factor=2.0, head_budget="mass")
    assert layer.allocator.num_slots == 2 * layer.budget.retrieved_pages
    ctx = layer.context(scaling=32**-0.5)
    for s in range(4):
        sel = layer.selector.select(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(s)), ctx)
        sel.validate(ctx.num_pages)
        assert int(sel.valid.sum()) == 2 * ctx.k and sel.k == 2 * ctx.k


def test_preset_and_search_params_untouched():
    assert get_registry().get("preset", "icecache-rerank")["selector"] == {"name": "icecache", "rerank": "max"}
    pol = Policy.preset("icecache-rerank", budget=64)
    assert pol.selector.params["rerank"] == "max"
    assert isinstance(IceCacheSelector(rerank="mass").search_params(_layer("mass")[0].context()), SearchParams)


# ------------------------------------------------------------------------------------ end to end on a tiny model
@pytest.fixture(scope="module")
def model():
    from tests.test_icecache import _model

    return _model(layers=4)


@pytest.mark.parametrize("rule", ["max", "mass"])
def test_unlimited_budget_still_equals_full(model, rule):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)[:, 300:]
    pol = {"preset": "icecache", "selector": {"name": "icecache", "rerank": rule}}
    res = kvpolicy.generate(model, ids, policy=pol, budget=None, max_new_tokens=20, validate=True)
    assert torch.equal(res.token_ids, ref)


@pytest.mark.parametrize("rule", ["max", "mass"])
@pytest.mark.parametrize("budget", [64, 128])
def test_runs_end_to_end_within_budget(model, rule, budget):
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(1))
    pol = {"preset": "icecache", "selector": {"name": "icecache", "rerank": rule}}
    res = kvpolicy.generate(model, ids, policy=pol, budget=budget, max_new_tokens=6, validate=True)
    b = Policy.resolve(pol, budget=budget).resolve_budget()
    assert res.stats["pages_selected"] == 5 * 2 * 2 * b.retrieved_pages
