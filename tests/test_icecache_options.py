"""Options of the ``icecache`` plugin beyond the paper (issue 22, item 3): page size from the budget, sink/window
tokens by budget, the GQA merge rule, per-head budgets; the frozen preset ``icecache-paper``."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.layer import PolicyLayer
from kvpolicy.ops import group_page_scores, page_max_scores, rank_group_pages, share_pages
from kvpolicy.policy import Policy, auto_page_size
from kvpolicy.reference.exact_index import ExactIndex
from kvpolicy.registry import get_registry
from kvpolicy.testing import SelectorConformance, clustered_keys, page_recall
from kvpolicy.types import SearchParams, Selection
from kvpolicy_icecache.dci_tree_index import DCITreeIndex
from kvpolicy_icecache.icecache_selector import IceCacheSelector

# ------------------------------------------------------------------------------------ conformance of every option
_OPTIONS = {
    "max": ({"gqa_merge": "max"}, {}),
    "mean": ({"gqa_merge": "mean"}, {}),
    "mass": ({"gqa_merge": "max", "head_budget": "mass"}, {}),
    "mass_mean_cap3": ({"gqa_merge": "mean", "head_budget": "mass", "head_budget_max": 3.0}, {}),
    "auto_pages": ({}, {"page_size": "auto"}),
    "split": ({}, {"split_tokens": {64: [8, 8], 128: [16, 16]}, "page_size": 8}),
    "pages_4": ({}, {"page_size": 4}),
}

for _tag, (_sel, _pol) in _OPTIONS.items():
    _attrs = {"selector_cls": IceCacheSelector, "index": "dci_tree", "selector_kwargs": _sel,
              "policy_kwargs": {k: v for k, v in _pol.items() if k != "page_size"}}
    if "page_size" in _pol:
        _attrs["page_size"] = _pol["page_size"]
    globals()[f"TestConformance_{_tag}"] = type(f"TestConformance_{_tag}", (SelectorConformance,), _attrs)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, listed", [
    ({"gqa_merge": "sum"}, "'interleave', 'max', 'mean'"),
    ({"head_budget": "entropy"}, "'uniform', 'mass'"),
])
def test_unknown_option_value_lists_the_valid_ones(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        IceCacheSelector(**kwargs)
    with pytest.raises(ValueError, match=listed):  # through a policy config, before any model work
        Policy.from_config({"preset": "icecache", "selector": {"name": "icecache", **kwargs}})


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="page_size must be an int >= 1 or one of 'auto'"):
        Policy.preset("icecache", page_size="big")
    with pytest.raises(ValueError, match="head_budget_max"):
        IceCacheSelector(gqa_merge="max", head_budget="mass", head_budget_max=0.5)
    with pytest.raises(ValueError, match="needs gqa_merge 'max' or 'mean'"):
        IceCacheSelector(head_budget="mass")
    for bad in ({64: [8]}, {64: [8, 0]}, {"x": [8, 8]}, [8, 8], {64: ["8", 8]}):
        with pytest.raises(ValueError, match="split_tokens"):
            Policy.preset("icecache", budget=64, split_tokens=bad)


def test_score_merge_needs_an_index_that_supports_it(monkeypatch):
    monkeypatch.setattr(ExactIndex, "gqa_merges", ("interleave",))
    pol = Policy(selector={"name": "icecache", "gqa_merge": "max"}, index="exact", budget=64)
    layer = PolicyLayer(pol, 0)
    layer.prefill(*_kv())
    with pytest.raises(ValueError, match="supports 'interleave'"):
        layer.selector.select(torch.randn(1, 4, 32), layer.context())
    with pytest.raises(ValueError, match="gqa_merge of index 'exact'"):
        layer.index.search(torch.randn(1, 4, 32), 4, params=SearchParams(gqa_merge="max"))


# ------------------------------------------------------------------------------------ page size and split
def test_auto_page_size_and_split_keep_token_counts():
    assert [auto_page_size(b) for b in (32, 64, 96, 128, 256, None)] == [4, 4, 8, 8, 16, 16]
    b64 = Policy.preset("icecache", budget=64, page_size="auto").resolve_budget()
    assert (b64.page_size, b64.sink_tokens, b64.window_tokens, b64.retrieved_pages) == (4, 16, 16, 8)
    b128 = Policy.preset("icecache", budget=128, page_size="auto").resolve_budget()
    assert (b128.page_size, b128.sink_tokens, b128.window_tokens, b128.retrieved_pages) == (8, 32, 32, 8)
    b256 = Policy.preset("icecache", budget=256, page_size="auto").resolve_budget()
    assert (b256.page_size, b256.sink_pages, b256.window_pages, b256.retrieved_pages) == (16, 2, 2, 12)
    pol = Policy.preset("icecache", budget=64, page_size="auto")
    assert pol.with_budget(256).resolved_page_size == 16  # the rule, not its value at 64, travels with the policy


def test_split_tokens_apply_up_to_their_budget():
    table = {64: [8, 8], 128: [16, 16]}
    got = {b: Policy.preset("icecache", budget=b, page_size=8, split_tokens=table).split_in_tokens()
           for b in (64, 128, 256)}
    assert got == {64: (8, 8), 128: (16, 16), 256: (32, 32)}
    b = Policy.preset("icecache", budget=64, page_size=4, split_tokens={64: [4, 8]}).resolve_budget()
    assert (b.sink_pages, b.window_pages, b.retrieved_pages) == (1, 2, 13)
    assert Policy.preset("icecache", budget=64, sink_pages=2, split_tokens=table).split() == (2, 1)  # explicit wins


def test_options_round_trip_through_config():
    pol = Policy.from_config({"preset": "icecache", "budget": 128, "page_size": "auto",
                              "split_tokens": {"128": [16, 16]},  # JSON keys are strings
                              "selector": {"name": "icecache", "gqa_merge": "max", "head_budget": "mass"}})
    cfg = pol.to_config()
    assert cfg["page_size"] == "auto" and cfg["split_tokens"] == {128: [16, 16]}
    again = Policy.from_config(cfg)
    assert again.resolve_budget() == pol.resolve_budget() and again.selector == pol.selector
    assert "split_tokens" not in Policy.preset("icecache", budget=128).to_config()  # earlier rows unchanged


def test_paper_preset_is_todays_icecache():
    reg = get_registry()
    assert reg.get("preset", "icecache-paper") == reg.get("preset", "icecache")
    pol = Policy.preset("icecache-paper", budget=64)
    assert (pol.resolved_page_size, pol.split()) == (16, (1, 1))
    assert IceCacheSelector().gqa_merge == "interleave" and IceCacheSelector().head_budget == "uniform"


# ------------------------------------------------------------------------------------ GQA merge in the indexes
def _kv(T=600, seed=0):
    keys = clustered_keys(B=1, H=2, T=T, D=32, seed=seed)
    return keys, torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed + 1))


def _truth(keys, layout, q, k, rule):
    """Ground truth for a score-based merge over an index's own layout."""
    B, H, T, _ = keys.shape
    G = q.shape[1] // H
    scores = torch.einsum("bhgd,bhtd->bhgt", q.view(B, H, G, -1), keys).reshape(B, H * G, T)
    tp = torch.full((B, H, T), -1, dtype=torch.int64)
    for h in range(H):
        for p in range(layout.page_ids.shape[-1]):
            t = layout.token_ids[0, h, p]
            tp[0, h, t[t >= 0]] = layout.page_ids[0, h, p]
    tp = tp.repeat_interleave(G, dim=1)
    ps = page_max_scores(scores, tp, int(layout.num_pages.max())).view(B, H, G, -1)
    return rank_group_pages(ps, k, rule)


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_score_merges_rank_the_group_by_merged_scores(rule):
    keys, _ = _kv(seed=3)
    q = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    idx = DCITreeIndex.tiny()
    lay = idx.build(keys, page_size=16)
    for k in (8, 1000):  # the descent, and the exhaustive ranking
        sel = idx.search(q, k, params=SearchParams(gqa_merge=rule))
        sel.validate(idx.num_pages)
        ids, scores = _truth(keys, lay, q, k, rule)
        assert page_recall(sel, Selection(page_ids=ids)) >= (0.8 if k == 8 else 1.0)
        assert bool((sel.scores[:, :, :-1] >= sel.scores[:, :, 1:]).all()), "best first"
        if k == 1000:  # every page, best first (the index pads to its page capacity)
            w = ids.shape[-1]
            assert torch.equal(sel.page_ids[..., :w], ids) and torch.allclose(sel.scores[..., :w], scores, atol=1e-4)
            assert bool((sel.page_ids[..., w:] == -1).all())
    beam = DCITreeIndex.tiny()
    masked = DCITreeIndex(ratio_1=0.05, min_field_of_view=4, search_mode="masked")
    for idx in (beam, masked):
        idx.build(keys, page_size=16)
    a, b = (i.search(q, 8, params=SearchParams(gqa_merge=rule)) for i in (beam, masked))
    assert torch.equal(a.page_ids, b.page_ids) and torch.allclose(a.scores, b.scores, atol=1e-4)
    ex = ExactIndex()
    ex_lay = ex.build(keys, page_size=16)
    got = ex.search(q, 8, params=SearchParams(gqa_merge=rule))
    assert torch.equal(got.page_ids, _truth(keys, ex_lay, q, 8, rule)[0])


def test_group_mean_skips_heads_that_did_not_score():
    s = torch.tensor([[[1.0, float("-inf"), float("-inf")], [3.0, 5.0, float("-inf")]]])  # [1, G=2, P=3]
    assert group_page_scores(s, "mean").tolist() == [[[2.0, 5.0, float("-inf")]]]
    assert group_page_scores(s, "max").tolist() == [[[3.0, 5.0, float("-inf")]]]


# ------------------------------------------------------------------------------------ per-head budgets
def test_share_pages_gives_flat_heads_more_with_the_total_fixed():
    C, k = 8, 4
    ids = torch.arange(C).expand(1, 2, C).clone()
    peaked = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 0])
    flat = torch.linspace(1.0, 0.9, C)
    got = share_pages(ids, torch.stack([peaked, flat])[None], k)
    n = (got >= 0).sum(-1)[0].tolist()
    assert sum(n) == 2 * k and n[1] > n[0] >= 1
    assert all(torch.equal(got[0, h, : n[h]], ids[0, h, : n[h]]) for h in range(2)), "each head keeps a prefix"
    ids[0, 1, 3:] = -1  # a head with fewer candidates: the row keeps what exists
    few = share_pages(ids, torch.stack([flat, flat])[None].masked_fill(ids < 0, float("-inf")), k)
    assert (few >= 0).sum().item() == 2 * k and (few[0, 1] >= 0).sum().item() == 3


def test_per_head_budget_is_not_shardable():
    from kvpolicy.distributed import check_shardable

    check_shardable(Policy.preset("icecache", selector={"name": "icecache", "gqa_merge": "max"}, budget=64))
    with pytest.raises(ValueError, match="not shardable"):
        check_shardable(Policy.preset("icecache", budget=64,
                                      selector={"name": "icecache", "gqa_merge": "max", "head_budget": "mass"}))


def test_per_head_budget_holds_the_total_in_a_layer():
    keys, values = _kv(seed=5)
    pol = Policy(selector={"name": "icecache", "gqa_merge": "max", "head_budget": "mass"}, index="dci_tree",
                 budget=128)
    layer = PolicyLayer(pol, 0, validate=True)
    layer.prefill(keys, values)
    assert layer.allocator.num_slots == 2 * pol.resolve_budget().retrieved_pages  # the per-head cap
    ctx = layer.context(scaling=32**-0.5)
    for seed in range(4):
        sel = layer.selector.select(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed)), ctx)
        assert int(sel.valid.sum()) == 2 * ctx.k and sel.k == 2 * ctx.k


# ------------------------------------------------------------------------------------ end to end on a tiny model
_POLICIES = {
    "icecache-paper": "icecache-paper",
    "auto_pages": {"preset": "icecache", "page_size": "auto"},
    "split": {"preset": "icecache", "page_size": "auto", "split_tokens": {128: [8, 8]}},
    "max": {"preset": "icecache", "selector": {"name": "icecache", "gqa_merge": "max"}},
    "mean_mass": {"preset": "icecache", "selector": {"name": "icecache", "gqa_merge": "mean", "head_budget": "mass"}},
}


@pytest.fixture(scope="module")
def model():
    from tests.test_icecache import _model

    return _model(layers=4)


@pytest.mark.parametrize("name", list(_POLICIES))
def test_unlimited_budget_still_equals_full(model, name):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)[:, 300:]
    res = kvpolicy.generate(model, ids, policy=_POLICIES[name], budget=None, max_new_tokens=20, validate=True)
    assert torch.equal(res.token_ids, ref)


@pytest.mark.parametrize("name", list(_POLICIES))
@pytest.mark.parametrize("budget", [64, 128])
def test_each_option_runs_end_to_end(model, name, budget):
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(1))
    res = kvpolicy.generate(model, ids, policy=_POLICIES[name], budget=budget, max_new_tokens=6, validate=True)
    b = Policy.resolve(_POLICIES[name], budget=budget).resolve_budget()
    assert b.tokens == budget
    # 2 sparse layers x 2 KV heads x 5 steps after the prefill's token: the total never exceeds the budget's pages
    assert res.stats["pages_selected"] == 5 * 2 * 2 * b.retrieved_pages
