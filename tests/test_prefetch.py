"""Selection ahead of the step (``KVPolicyCache(prefetch=...)``): followers exact, the next-layer query estimate,
stale prefetches released, errors."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache
from tests.conftest import tiny_model


def _model():
    return tiny_model("llama", layers=8)  # icecache-reuse: anchors 2, 5; followers 3, 4, 6, 7


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _run(model, preset, prefetch, ids, n=40, budget=128):
    cache = KVPolicyCache(model, preset, budget=budget, prefetch=prefetch, validate=True)
    try:
        with torch.inference_mode():
            out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    return out, cache


@pytest.mark.parametrize("preset", ["icecache-reuse", "omnikv"])
def test_followers_prefetched_give_the_same_tokens_and_pages(model, preset):
    ids = _ids(700)
    ref, c0 = _run(model, preset, "off", ids)
    out, c1 = _run(model, preset, "follow", ids)
    assert torch.equal(out, ref)
    followers = {f for fs in c1.followers.values() for f in fs}
    assert followers
    for i in c1.policy_layers:
        a, b = c0.layers[i].state, c1.layers[i].state
        a.wait_ready(), b.wait_ready()  # the last insertions may still run on the worker
        assert torch.equal(b.last_selection.page_ids, a.last_selection.page_ids)
        # every decode step of a follower used its prefetch; no other layer prefetched
        assert b.stats.prefetched_steps == (b.stats.steps if i in followers else 0)
        assert b.stats.pages_inserted == a.stats.pages_inserted > 0  # the window flushed meanwhile
    assert c0.stats()["prefetched_steps"] == 0


def test_estimate_is_the_next_layers_projection_of_this_layers_input():
    """With layer 3's q_proj a copy of layer 2's, the estimate of layer 3's query from layer 2's attention input
    is exactly the query layer 2 attended with (same input, same projection, same RoPE)."""
    model = _model()
    with torch.no_grad():
        model.model.layers[3].self_attn.q_proj.weight.copy_(model.model.layers[2].self_attn.q_proj.weight)
    cache = KVPolicyCache(model, "icecache", budget=128, prefetch="estimate")
    assert cache.estimator.targets == [3, 4, 5, 6, 7]  # policy layers 2..7: each after a policy layer
    seen = {"decode": [], "prefetch": []}
    s2, s3 = cache.layers[2].state, cache.layers[3].state
    decode2, prefetch3 = s2.decode, s3.prefetch

    def spy_decode(query, *a, **k):
        seen["decode"].append(query.clone())
        return decode2(query, *a, **k)

    def spy_prefetch(query=None, **k):
        seen["prefetch"].append(query.clone())
        return prefetch3(query, **k)

    s2.decode, s3.prefetch = spy_decode, spy_prefetch
    try:
        with torch.inference_mode():
            model.generate(_ids(600, seed=1), **cache_kwargs(cache), max_new_tokens=12, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(seen["prefetch"]) == len(seen["decode"]) == 11
    for q_est, q in zip(seen["prefetch"], seen["decode"]):
        torch.testing.assert_close(q_est, q, rtol=1e-5, atol=1e-5)
    assert s3.stats.prefetched_steps == s3.stats.steps == 11
    assert cache.layers[2].state.stats.prefetched_steps == 0  # layer 1 is dense: nothing estimates layer 2


def test_generate_takes_the_prefetch_mode(model):
    import kvpolicy

    ids = _ids(500, seed=5)
    a = kvpolicy.generate(model, ids, policy="icecache-reuse", budget=128, max_new_tokens=20)
    b = kvpolicy.generate(model, ids, policy="icecache-reuse", budget=128, max_new_tokens=20, prefetch="follow")
    assert torch.equal(a.token_ids, b.token_ids)
    assert b.stats["prefetched_steps"] > 0 == a.stats["prefetched_steps"]
    with pytest.raises(ValueError, match="unknown prefetch mode"):
        kvpolicy.generate(model, ids, policy="icecache", budget=128, prefetch="later")


def test_estimate_runs_within_the_budget_with_reuse(model):
    out, cache = _run(model, "icecache-reuse", "estimate", _ids(900, seed=2), n=24)
    assert out.shape[1] == 924
    assert cache.estimator.targets == [5]  # anchor 5 follows policy layer 4; anchor 2 follows a dense layer
    st = cache.stats()
    assert st["prefetched_steps"] == 5 * 23  # followers 3, 4, 6, 7 and anchor 5, every decode step


def test_a_prefetch_the_step_does_not_use_is_released(model):
    ids = _ids(700, seed=3)
    _, cache = _run(model, "icecache-reuse", "follow", ids, n=20)
    st, anchor = cache.layers[3].state, cache.layers[2].state
    pins = st.allocator._pins
    assert int(pins.sum()) == 0
    with torch.inference_mode():  # as in generation (the allocator's tables are inference tensors)
        assert st.prefetch(prev_selection=anchor.last_selection)
        held = int(pins.sum())
        assert held > 0
        assert st.prefetch(prev_selection=anchor.last_selection)  # replaces the first: its slots come back
        assert int(pins.sum()) == held
        st.step += 1  # the next step is not the one it was made for: dropped at that step
        assert st._take_ahead() is None
    assert int(pins.sum()) == 0


def test_prefetch_errors(model):
    with pytest.raises(ValueError, match="unknown prefetch mode 'soon'"):
        KVPolicyCache(model, "icecache", prefetch="soon")
    with pytest.raises(ValueError, match="needs the model"):
        KVPolicyCache(model.config, "icecache", prefetch="estimate")
    with pytest.raises(ValueError, match="defer_insert"):
        KVPolicyCache(model, "icecache", prefetch="follow", defer_insert=True)
    model.set_attn_implementation("sdpa")
    _, cache = _run(model, "icecache-reuse", "follow", _ids(500, seed=4), n=3)
    st = cache.layers[3].state
    with pytest.raises(ValueError, match="query must be"):
        st.prefetch(torch.zeros(1, 3, 16))


def test_estimator_hooks_go_with_the_cache(model):
    cache = KVPolicyCache(model, "icecache", budget=128, prefetch="estimate")
    model.set_attn_implementation("sdpa")
    hooks = model.model.layers[2].self_attn._forward_pre_hooks
    assert len(hooks) == 1
    est = cache.estimator
    del cache
    import gc

    gc.collect()
    with torch.inference_mode():
        model(_ids(8))  # the first forward after the cache is gone removes the hooks
    assert len(hooks) == 0 and not est._hooks
