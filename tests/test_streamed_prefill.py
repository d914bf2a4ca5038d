"""Streamed prefill and continued prompts: a multi-token forward on a cache that holds tokens attends exactly to
all of them (CPU, tiny random models; ``kvpolicy.chunk_attention`` against its fp32 definition)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.chunk_attention import partial_attention, reference_partial
from kvpolicy.generation import prefill
from kvpolicy.hf import KVPolicyCache
from tests.conftest import tiny_model


def _dense(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.parametrize("causal", [False, True])
def test_partial_attention_matches_definition_and_merges(causal):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 2, 6, 2, 7, 16
    q = torch.randn(B, Hq, L, D, generator=g)
    k, v = torch.randn(B, Hkv, 19, D, generator=g), torch.randn(B, Hkv, 19, D, generator=g)
    valid = torch.rand(B, Hkv, 12, generator=g) > 0.3
    valid[1, 0] = False  # a head with no valid key in this piece
    past = partial_attention(q, k[:, :, :12], v[:, :, :12], scale=0.3, valid=valid)
    ref = reference_partial(q, k[:, :, :12], v[:, :, :12], scale=0.3, valid=valid)
    torch.testing.assert_close(past.out[:, :3], ref.out[:, :3], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(past.lse[1, :3]).all()
    own = partial_attention(q, k[:, :, 12:], v[:, :, 12:], scale=0.3, causal=True)
    torch.testing.assert_close(own.out, reference_partial(q, k[:, :, 12:], v[:, :, 12:], scale=0.3, causal=True).out,
                               atol=1e-5, rtol=1e-5)
    # the merge of the pieces is attention over their union (the past masked as `valid`, the chunk causally)
    keep = torch.cat([valid, torch.ones(B, Hkv, 7, dtype=torch.bool)], -1)
    G = Hq // Hkv
    s = torch.einsum("bhld,bhnd->bhln", q, k.repeat_interleave(G, 1)) * 0.3
    s = s.masked_fill(~keep.repeat_interleave(G, 1).unsqueeze(2), float("-inf"))
    s[..., 12:] = s[..., 12:].masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("bhln,bhnd->bhld", s.softmax(-1), v.repeat_interleave(G, 1))
    torch.testing.assert_close(past.merge(own).out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("chunk", [48, 64, 160])  # 48 and 64 do not divide the 190-token prompt; 160 leaves 30
def test_streamed_prefill_reproduces_dense(arch, chunk):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 190), generator=torch.Generator().manual_seed(1))
    ref = _dense(model, ids, 24)
    res = kvpolicy.generate(model, ids, policy="exact-topk", budget=None, max_new_tokens=24, prefill_chunk=chunk,
                            validate=True)
    assert torch.equal(res.token_ids, ref)
    assert res.stats["prompt_chunks"] > 0


@pytest.mark.parametrize("policy", ["icecache", "quest", "full"])
def test_streamed_prefill_other_policies_reproduce_dense(tiny_llama, policy):
    ids = torch.randint(0, 128, (1, 230), generator=torch.Generator().manual_seed(5))
    ref = _dense(tiny_llama, ids, 20)
    res = kvpolicy.generate(tiny_llama, ids, policy=policy, budget=None, max_new_tokens=20, prefill_chunk=64)
    assert torch.equal(res.token_ids, ref)


def test_streamed_prefill_at_a_small_budget_matches_one_shot(tiny_llama):
    """The prefill is exact either way, so at a limited budget the streamed and the one-shot prefill decode
    the same tokens (the pool and index hold the same pages, inserted in another order)."""
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(6))
    one = kvpolicy.generate(tiny_llama, ids, policy="exact-topk", budget=96, max_new_tokens=16, prefill_chunk=None)
    streamed = kvpolicy.generate(tiny_llama, ids, policy="exact-topk", budget=96, max_new_tokens=16,
                                 prefill_chunk=64)
    assert torch.equal(one.token_ids, streamed.token_ids)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_continued_prompt_equals_one_prompt(arch):
    """A second multi-token forward (a chat's next turn) continues the cache: its logits and the tokens after it
    are those of the same text sent as one prompt."""
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 170), generator=torch.Generator().manual_seed(7))
    ref = _dense(model, ids, 12)
    def two_turns():
        cache = KVPolicyCache(model, "oracle", budget=None, prefill_chunk=None)
        model(ids[:, :100], **cache_kwargs(cache), use_cache=True)
        model(ids[:, 100:120], **cache_kwargs(cache), use_cache=True)  # decodes nothing in between
        return cache

    with torch.inference_mode():
        whole = model(ids).logits[:, -1]
        turn = model(ids[:, 120:], **cache_kwargs(two_turns()), use_cache=True).logits[:, -1]
        # generate() runs the rest of the prompt (ids[:, 120:]) as a third multi-token forward, then decodes
        out = model.generate(ids, **cache_kwargs(two_turns()), max_new_tokens=12, do_sample=False)[:, 170:]
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(turn, whole, atol=1e-4, rtol=1e-4)
    assert torch.equal(out, ref)


def test_prefill_helper_with_a_dense_cache(tiny_llama):
    """``prefill`` with the ``kvpolicy`` attention and a plain DynamicCache: the chunks attend without a mask over
    earlier tokens and give the one-forward logits."""
    from transformers import DynamicCache

    from kvpolicy.hf import ATTN_IMPLEMENTATION, register_attention

    ids = torch.randint(0, 128, (1, 130), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        whole = tiny_llama(ids).logits[:, -1]
        register_attention()
        tiny_llama.set_attn_implementation(ATTN_IMPLEMENTATION)
        try:
            last = prefill(tiny_llama, DynamicCache(config=tiny_llama.config), ids, 32)
        finally:
            tiny_llama.set_attn_implementation("sdpa")
    torch.testing.assert_close(last, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [0, -16, 40, 16.0, True])
def test_bad_chunk_sizes_are_refused(tiny_llama, chunk):
    with pytest.raises(ValueError, match="prefill_chunk must be a positive multiple of the page size 16"):
        KVPolicyCache(tiny_llama, "oracle", prefill_chunk=chunk)
    tiny_llama.set_attn_implementation("sdpa")


def test_policy_that_cannot_extend(tiny_llama):
    """SnapKV scores the whole prompt's queries: no streamed prefill (refused up front; "auto" falls back to one
    forward), and a continued prompt is refused before any layer changes."""
    with pytest.raises(ValueError, match="snapkv.*cannot be streamed"):
        KVPolicyCache(tiny_llama, "snapkv", budget=64, prefill_chunk=64)
    cache = KVPolicyCache(tiny_llama, "snapkv", budget=64)
    assert cache.prefill_chunk is None
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        tiny_llama(ids, **cache_kwargs(cache), use_cache=True)
        lens = [cache.layers[i].state.seq_len for i in cache.policy_layers]
        with pytest.raises(ValueError, match="cannot take a continued prompt"):
            tiny_llama(ids[:, :20], **cache_kwargs(cache), use_cache=True)
    tiny_llama.set_attn_implementation("sdpa")
    assert [cache.layers[i].state.seq_len for i in cache.policy_layers] == lens


def test_progress_bars_over_the_prompt_chunks_and_the_index_builds(tiny_llama, capsys):
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(10))
    kvpolicy.generate(tiny_llama, ids, policy="exact-topk", budget=96, max_new_tokens=2, prefill_chunk=64,
                      progress=True)
    err = capsys.readouterr().err
    assert "prefill" in err and "index build" in err and "3/3" in err  # tiny_llama: 3 layers, 3 builds


def test_streamed_icecache_rebuilds_its_tree_over_the_prompt(tiny_llama):
    """The DCI tree's centres are fixed at build, so a streamed prompt builds the tree again whenever its tokens
    have doubled. Here the last doubling falls on the last chunk (1,024 tokens in chunks of 256: builds over the
    first chunk's offloaded tokens, then at 512 and 1,024 tokens), so the tree is the one-shot prefill's: the same
    pages, and at a limited budget the same tokens. Without the rebuilds the streamed tree differs."""
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(8))
    kw = dict(policy="icecache", budget=128, max_new_tokens=24)
    one = kvpolicy.generate(tiny_llama, ids, prefill_chunk=None, **kw)
    streamed = kvpolicy.generate(tiny_llama, ids, prefill_chunk=256, **kw)
    assert one.stats["rebuilds"] == 0 and streamed.stats["rebuilds"] > 0
    assert torch.equal(one.token_ids, streamed.token_ids)
    caches = []
    for chunk in (None, 256):  # the trees themselves: same pages (token ids of every page) in every layer
        cache = KVPolicyCache(tiny_llama, kvpolicy.policy.Policy.resolve("icecache", budget=128), prefill_chunk=chunk)
        if chunk:
            prefill(tiny_llama, cache, ids, chunk)
        else:
            with torch.inference_mode():
                tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        caches.append(cache)
    for i in caches[0].policy_layers:
        a, b = (c.layers[i].state for c in caches)
        a.wait_ready()
        b.wait_ready()
        assert torch.equal(a.index.token_pages(), b.index.token_pages()), i
