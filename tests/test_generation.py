"""End-to-end generation through KVPolicyCache on tiny random models (token-for-token vs dense)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.errors import UnsupportedModelError
from kvpolicy.hf import KVPolicyCache, PolicyCacheLayer
from tests.conftest import tiny_model

POLICIES = ["full", "oracle", "streaming", "exact-topk"]


def _dense(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_unlimited_budget_reproduces_dense(arch, policy):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    ref = _dense(model, ids, 40)  # 40 new tokens: several window pages are inserted into the index
    res = kvpolicy.generate(model, ids, policy=policy, budget=None, max_new_tokens=40, validate=True)
    assert torch.equal(res.token_ids, ref)
    assert res.stats["pages_inserted"] > 0
    assert model.config._attn_implementation != "kvpolicy"  # restored


def test_gemma3_sliding_layers_are_not_offloaded():
    model = tiny_model("gemma3")
    cache = KVPolicyCache(model, "oracle", budget=None)
    types = model.config.layer_types
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, PolicyCacheLayer) == (types[i] == "full_attention"), i


def test_budget_limits_attended_pages(tiny_llama):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    res = kvpolicy.generate(tiny_llama, ids, policy="exact-topk", budget=160, max_new_tokens=5, validate=True)
    # 160 tokens = 10 pages: 2 sink + 2 window + 6 retrieved, per KV head and layer (3 layers x 2 heads)
    assert res.stats["pages_selected"] == 4 * 6 * 2 * 3
    assert "6 retrieved" in res.budget


def test_dense_layers_stay_dense(tiny_llama):
    cache = KVPolicyCache(tiny_llama, {"preset": "oracle", "dense_layers": [0]}, budget=None)
    assert not isinstance(cache.layers[0], PolicyCacheLayer)
    assert isinstance(cache.layers[1], PolicyCacheLayer)


def test_from_dense_prefill_reproduces_dense(tiny_llama):
    """A prefill computed once (DynamicCache) and handed to a policy cache decodes like the dense model."""
    from transformers import DynamicCache

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    ref = _dense(tiny_llama, ids, 30)
    dense = DynamicCache(config=tiny_llama.config)
    with torch.inference_mode():
        tiny_llama(ids[:, :-1], **cache_kwargs(dense), use_cache=True)
        before = dense.layers[1].keys.clone()
        cache = KVPolicyCache.from_dense(tiny_llama, "exact-topk", dense, budget=None)
        out = tiny_llama.generate(ids, **cache_kwargs(cache), max_new_tokens=30, do_sample=False)
    tiny_llama.set_attn_implementation("sdpa")
    assert torch.equal(out[:, 200:], ref)
    assert torch.equal(dense.layers[1].keys, before)  # the shared prefill is not modified


@pytest.mark.parametrize("policy", ["oracle", "exact-topk", "icecache"])
def test_budget_at_or_above_the_context_attends_everything(tiny_llama, policy):
    """A budget the context fits in is no error: every page is attended (as the whole cache would be), the
    steps are counted as covered, and decoding goes on under the budget once the context outgrows it."""
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    ref = _dense(tiny_llama, ids, 8)
    res = kvpolicy.generate(tiny_llama, ids, policy=policy, budget=256, max_new_tokens=8, validate=True)
    assert torch.equal(res.token_ids, ref)
    assert res.stats["covered_steps"] == res.stats["steps"] * len(KVPolicyCache(tiny_llama.config, policy).policy_layers)
    assert "whole context" in res.summary()
    long = kvpolicy.generate(tiny_llama, ids, policy=policy, budget=96, max_new_tokens=8)
    assert long.stats["covered_steps"] == 0 and "whole context" not in long.summary()
    assert tiny_llama.config._attn_implementation != "kvpolicy"


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        kvpolicy.generate(model, torch.zeros(1, 8, dtype=torch.long), policy="full")


def test_padded_batches_are_rejected(tiny_llama):
    inputs = {"input_ids": torch.ones(2, 40, dtype=torch.long), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    inputs["attention_mask"][1, :5] = 0
    with pytest.raises(ValueError, match="padded"):
        kvpolicy.generate(tiny_llama, inputs, policy="full")
