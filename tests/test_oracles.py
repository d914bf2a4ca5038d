"""Oracles that split the loss (issue 22): exact top-k by attention mass at page sizes 1 (tokens), 4, 8, 16."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.policy import Policy
from kvpolicy.reference.oracle_selector import page_attention_mass
from kvpolicy.reference.plugin import ORACLE_PAGE_SIZES

ORACLES = list(ORACLE_PAGE_SIZES)


def test_presets_differ_only_in_page_size_and_keep_the_sink_and_window_tokens():
    assert ORACLE_PAGE_SIZES == {"oracle-token": 1, "oracle-p4": 4, "oracle-p8": 8, "oracle-p16": 16}
    ref = Policy.preset("oracle", budget=64)
    for name, size in ORACLE_PAGE_SIZES.items():
        for budget, fixed in ((64, 16), (128, 32), (256, 32)):  # sink = window = 16 tokens below 128, else 32
            pol = Policy.preset(name, budget=budget)
            assert pol.page_size == size and pol.selector.name == "oracle"
            sink, window = pol.split()
            assert sink * size == window * size == fixed, (name, budget)
            b = pol.resolve_budget()
            assert (b.sink_pages + b.window_pages + b.retrieved_pages) * size == budget  # the whole budget, in tokens
        assert Policy.preset(name, budget=64).split()[0] * size == ref.split()[0] * ref.page_size
    assert Policy.preset("oracle-token", budget=64).resolve_budget().retrieved_pages == 32  # 64 - 16 - 16 single tokens


@pytest.mark.parametrize("policy", ORACLES)
def test_unlimited_budget_decodes_like_full(tiny_llama, policy):
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))
    full = kvpolicy.generate(tiny_llama, ids, policy="full", budget=None, max_new_tokens=30)
    res = kvpolicy.generate(tiny_llama, ids, policy=policy, budget=None, max_new_tokens=30, validate=True)
    assert torch.equal(res.token_ids, full.token_ids)


@pytest.mark.parametrize("policy", ORACLES)
def test_a_budget_selects_within_it(tiny_llama, policy):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    size = ORACLE_PAGE_SIZES[policy]
    res = kvpolicy.generate(tiny_llama, ids, policy=policy, budget=64, max_new_tokens=5, validate=True)
    # 64 tokens = 16 sink + 16 window + 32 retrieved tokens, per KV head and layer (3 layers x 2 heads), 4 steps
    assert res.stats["pages_selected"] * size == 4 * 32 * 2 * 3
    assert f"{32 // size} retrieved" in res.budget
    assert res.stats.get("covered_steps", 0) == 0  # 300 tokens do not fit: the budget is in force
    full = kvpolicy.generate(tiny_llama, ids, policy="full", budget=None, max_new_tokens=5)
    assert res.token_ids.shape == full.token_ids.shape


def test_the_token_oracle_picks_the_tokens_with_the_most_attention():
    """At page size 1 the oracle selects the exact top-k tokens by softmax mass (summed over the GQA group)."""
    from kvpolicy.pool import PagePool
    from kvpolicy.reference.oracle_selector import OracleSelector
    from kvpolicy.types import Budget, SelectContext

    T, H, G, D, k = 40, 2, 2, 8, 6
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, H, T, D, generator=g)
    q = torch.randn(1, H * G, D, generator=g)
    pool = PagePool(1, H, 1, D, dtype=torch.float32, capacity=T)
    pool.k[:, :, :T, 0] = keys
    pool.lengths[:, :, :T] = 1
    ctx = SelectContext(layer=0, step=0, budget=Budget(1, 0, 1, k), seq_len=T + 1, index=None, pool=pool,
                        num_pages=torch.full((1, H), T), num_kv_heads=H, scaling=D ** -0.5, max_pages=T)
    sel = OracleSelector().select(q, ctx)
    mass = (torch.einsum("hgd,htd->hgt", q.view(H, G, D), keys[0]) * D ** -0.5).softmax(-1).sum(1)  # [H, T]
    want = mass.topk(k, dim=-1).indices
    got = sel.page_ids[0]
    for h in range(H):
        assert set(got[h].tolist()) == set(want[h].tolist()), h
    assert torch.allclose(page_attention_mass(q, ctx)[0], mass, atol=1e-5)
