"""IceCache selector and presets: budgets, dense layers, layer reuse through mirrored pages, determinism."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache, PolicyCacheLayer
from kvpolicy.policy import Policy
from kvpolicy.reference.mirror_index import MirrorIndex


def _model(layers=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["icecache", "icecache-reuse"])
def test_unlimited_budget_reproduces_dense(model, preset):
    ids = _ids(400)
    ref = model.generate(ids, max_new_tokens=40, do_sample=False)[:, 400:]
    res = kvpolicy.generate(model, ids, policy=preset, budget=None, max_new_tokens=40, validate=True)
    assert torch.equal(res.token_ids, ref)
    assert res.stats["pages_inserted"] > 0


def test_presets_keep_the_first_two_layers_dense(model):
    cache = KVPolicyCache(model, "icecache", budget=256)
    assert [isinstance(x, PolicyCacheLayer) for x in cache.layers] == [False, False] + [True] * 6
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("budget", [64, 128, 256, 512, 1024])
def test_every_paper_budget_runs_within_its_pages(model, budget):
    ids = _ids(1500, seed=1)
    res = kvpolicy.generate(model, ids, policy="icecache", budget=budget, max_new_tokens=6, validate=True)
    b = Policy.preset("icecache", budget=budget).resolve_budget()
    assert b.tokens == budget
    # every policy layer (6), KV head (2) and step (5 after the prefill's token) selects exactly the retrieved pages
    assert res.stats["pages_selected"] == 5 * 6 * 2 * b.retrieved_pages


def test_layer_reuse_mirrors_the_anchor(model):
    ids = _ids(600, seed=2)
    cache = KVPolicyCache(model, "icecache-reuse", budget=128)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=30, do_sample=False)
    model.set_attn_implementation("sdpa")
    anchors = {2: (3, 4), 5: (6, 7)}  # reference: anchors 2, 5, 8, ... and the two layers after each
    for a, followers in anchors.items():
        assert not isinstance(cache.layers[a].state.index, MirrorIndex)
        for f in followers:
            st = cache.layers[f].state
            assert isinstance(st.index, MirrorIndex) and st.index.anchor is cache.layers[a].state
            assert torch.equal(st.kv.cpu_pool.token_ids, cache.layers[a].state.kv.cpu_pool.token_ids)
            assert torch.equal(st.last_selection.page_ids, cache.layers[a].state.last_selection.page_ids)
            assert st.index.nbytes == 0
            assert not torch.equal(st.kv.cpu_pool.k, cache.layers[a].state.kv.cpu_pool.k)  # its own K/V


def test_same_seed_same_selection(model):
    ids = _ids(800, seed=3)
    sels = []
    for _ in range(2):
        cache = KVPolicyCache(model, "icecache", budget=128)
        with torch.inference_mode():
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=10, do_sample=False)
        sels.append((out, [cache.layers[i].state.last_selection.page_ids for i in cache.policy_layers]))
    model.set_attn_implementation("sdpa")
    assert torch.equal(sels[0][0], sels[1][0])
    assert all(torch.equal(a, b) for a, b in zip(sels[0][1], sels[1][1]))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="fov_ratio"):
        Policy(selector={"name": "icecache", "fov_ratio": 2.0}, index="dci_tree")
    with pytest.raises(ValueError, match="prop_to_retrieve"):
        Policy(selector={"name": "icecache", "prop_to_retrieve": 0.0}, index="dci_tree")
