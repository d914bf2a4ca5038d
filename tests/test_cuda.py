"""The CUDA path: pinned CPU page pools, device slot pools, real page moves, dense equivalence on the GPU."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache, PolicyCacheLayer
from tests.conftest import tiny_model

pytestmark = pytest.mark.cuda


def _decode_each(model, ids, policy, n, variants):
    """Greedy decoding of ``n`` tokens once per keyword set of ``KVPolicyCache``: (outputs, caches)."""
    outs, caches = [], []
    for kw in variants:
        cache = KVPolicyCache(model, policy, **kw)
        with torch.inference_mode():
            outs.append(model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False))
        caches.append(cache)
    model.set_attn_implementation("sdpa")
    return outs, caches


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy", ["full", "oracle", "streaming", "exact-topk", "icecache", "icecache-reuse"])
def test_unlimited_budget_reproduces_dense_on_cuda(arch, policy):
    model = tiny_model(arch).cuda()
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    ref = model.generate(ids, max_new_tokens=40, do_sample=False)[:, 150:]
    res = kvpolicy.generate(model, ids, policy=policy, budget=None, max_new_tokens=40, validate=True)
    assert torch.equal(res.token_ids, ref)


def test_offloaded_pages_live_in_pinned_cpu_memory():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(2)).cuda()
    cache = KVPolicyCache(model, "exact-topk", budget=128)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=20, do_sample=False)
    model.set_attn_implementation("sdpa")
    for layer in cache.layers:
        assert isinstance(layer, PolicyCacheLayer)
        st, kv = layer.state, layer.state.kv
        assert kv.cpu_pool.k_chunks[0].device.type == "cpu" and all(c.is_pinned() for c in kv.cpu_pool.k_chunks)
        assert kv.gpu_pool.k.device.type == "cuda" and kv.gpu_pool.capacity == 4  # 128 = (2+2+4) pages
        assert kv.sink_k.device.type == "cuda" and kv.win_k.device.type == "cuda"
        assert st.stats.pages_moved > 0 and st.stats.bytes_moved > 0
    mem = cache.memory()
    assert mem["device_kv"] < 0.4 * mem["cpu_kv"]  # 128 of ~620 tokens on the GPU


@pytest.mark.parametrize("index_device", ["cpu", "cuda"])
@pytest.mark.parametrize("preset", ["icecache", "icecache-reuse"])
def test_background_jobs_on_cuda_match_inline(preset, index_device):
    """Prefill builds and page insertions on the background worker (own CUDA stream) decode exactly like inline."""
    from kvpolicy.policy import Policy

    model = tiny_model("llama", layers=6).cuda()  # layers 3, 4 mirror anchor 2 under icecache-reuse
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(3)).cuda()
    base = Policy.preset(preset, budget=128)
    pol = Policy.from_config({**base.to_config(), "index": {"name": "dci_tree", "device": index_device},
                              "dense_layers": [0]})
    outs, caches = _decode_each(model, ids, pol, 40, [{"overlap": False}, {"overlap": True}])
    assert torch.equal(outs[0], outs[1])
    assert caches[1].stats()["pages_inserted"] == caches[0].stats()["pages_inserted"] > 0


def test_dci_tree_masked_and_beam_search_agree_on_cuda():
    from kvpolicy.testing import clustered_keys
    from kvpolicy_icecache.dci_tree_index import DCITreeIndex

    keys = clustered_keys(B=2, H=4, T=8192, D=64, seed=5).cuda()
    q = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(6)).cuda()
    sels = []
    for mode in ("beam", "masked"):
        idx = DCITreeIndex(device="cuda", search_mode=mode)
        idx.build(keys, page_size=16)
        sels.append(idx.search(q, 12).page_ids)
    assert torch.equal(sels[0], sels[1])


def test_dci_tree_graph_search_follows_adds_and_growth():
    """The CUDA-graph replay of the masked search sees in-place updates (add) and re-captures on reallocation."""
    from kvpolicy.testing import clustered_keys
    from kvpolicy_icecache.dci_tree_index import DCITreeIndex

    keys = clustered_keys(B=1, H=4, T=4096 + 80 * 16, D=64, seed=7).cuda()
    q = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(8)).cuda()
    a, b = DCITreeIndex(device="cuda"), DCITreeIndex(device="cuda", cuda_graphs=False)
    for idx in (a, b):
        idx.build(keys[:, :, :4096], page_size=16)
    captures = set()
    for i in range(80):  # 1280 new tokens: past the initial headroom, so the token tables grow
        page = keys[:, :, 4096 + 16 * i : 4096 + 16 * (i + 1)]
        a.add(page)
        b.add(page)
        if i % 8 == 0:
            assert torch.equal(a.search(q, 12).page_ids, b.search(q, 12).page_ids)
            captures.add(a._graph.key)
    assert len(captures) >= 2  # at least one re-capture after a reallocation


@pytest.mark.parametrize("preset", ["icecache", "icecache-reuse", "icecache-index", "icecache-hostkeys",
                                    "icecache-bounded", "quest", "arkvale", "exact-topk"])
def test_captured_decode_steps_match_eager_ones(preset):
    """``PolicyLayer.cuda_graphs``: with the index on the GPU and the ``uva`` transfer, every decode step of
    an anchor layer is one CUDA-graph replay (re-captured when a table grows); outputs, selections and the
    page counters must match the eager steps, across window flushes and insertions."""
    from kvpolicy.layer import PolicyLayer
    from kvpolicy.policy import Policy

    pol = Policy.resolve_placed(f"{preset}@cuda:uva", budget=128)
    g = torch.Generator().manual_seed(3)
    B, H, G, D, T = 1, 2, 4, 64, 900
    keys = torch.randn(B, H, T, D, generator=g).cuda()
    vals = torch.randn(B, H, T, D, generator=g).cuda()
    steps = [(torch.randn(B, H * G, D, generator=g).cuda(), torch.randn(B, H, 1, D, generator=g).cuda(),
              torch.randn(B, H, 1, D, generator=g).cuda()) for _ in range(70)]
    runs = {}
    for graphs in (False, True):
        layer = PolicyLayer(pol, 2)  # an anchor layer (layer reuse: 2, 5, 8, ...)
        layer.cuda_graphs = graphs
        layer.prefill(keys, vals)
        outs, sels = [], []
        for q, k, v in steps:
            outs.append(layer.decode(q, k, v, scaling=D ** -0.5).clone())
            sels.append(layer.last_selection.page_ids.clone())
        torch.cuda.synchronize()
        runs[graphs] = (outs, sels, layer.stats.as_dict(), layer.graphs.captured)
    eager, graphed = runs[False], runs[True]
    assert graphed[3] and not eager[3]  # the graph path really ran
    for a, b in zip(eager[1], graphed[1]):
        assert torch.equal(a, b)
    for a, b in zip(eager[0], graphed[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for f in ("pages_selected", "pages_inserted"):
        assert eager[2][f] == graphed[2][f], f
    # a capture's warm-up stamps the LRU clock once more, so later evictions may differ slightly
    assert graphed[2]["pages_moved"] == pytest.approx(eager[2]["pages_moved"], rel=0.1)


@pytest.mark.parametrize("preset", ["icecache", "icecache-reuse", "icecache-hostkeys", "icecache-bounded", "quest"])
def test_captured_model_decoding_matches_eager(preset):
    """Whole-model decoding with every policy layer's step captured (anchors, and under ``icecache-reuse`` the
    layers that follow them, reading the anchor's ids from its graph's output) generates what eager decoding
    generates, across window flushes and insertions."""
    from kvpolicy.policy import Policy

    model = tiny_model("llama", layers=6).cuda()  # layers 3, 4 mirror anchor 2 under icecache-reuse
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(4)).cuda()
    base = Policy.resolve_placed(f"{preset}@cuda:uva", budget=128)
    pol = Policy.from_config({**base.to_config(), "dense_layers": [0]})
    outs, caches = [], []
    for graphs in (False, True):
        cache = KVPolicyCache(model, pol)
        for i in cache.policy_layers:
            cache.layers[i].state.cuda_graphs = graphs
        with torch.inference_mode():
            outs.append(model.generate(ids, **cache_kwargs(cache), max_new_tokens=48, do_sample=False))
        caches.append(cache)
    model.set_attn_implementation("sdpa")
    assert torch.equal(outs[0], outs[1])
    states = [caches[1].layers[i].state for i in caches[1].policy_layers]
    assert all(s.graphs.captured for s in states)  # every policy layer, followers included, replayed
    assert caches[1].stats()["pages_inserted"] == caches[0].stats()["pages_inserted"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_index_fused_search_matches_the_torch_scores(dtype):
    """``ExactIndex.search`` on CUDA (fused page scores over the capacity, page lengths on the device) ranks the
    pages as the float32 torch scores do, before and after insertions (a partial last page, a growth)."""
    from kvpolicy.ops import gqa_merge, topk_ids
    from kvpolicy.reference.exact_index import ExactIndex

    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 2, 1000, 64, generator=g).to(dtype).cuda()
    idx = ExactIndex(device="cuda")
    idx.build(keys[:, :, :700], page_size=16)
    for n in (0, 5, 300):  # 700 -> 705 (partial page) -> 1005 (beyond the headroom: the store grows)
        if n:
            idx.add(torch.randn(2, 2, n, 64, generator=g).to(dtype).cuda())
        q = torch.randn(2, 8, 64, generator=g).to(dtype).cuda()
        got = idx.search(q, 12).page_ids
        ref = gqa_merge(topk_ids(idx.page_scores(q), 12)[0].view(2, 2, 4, -1), 12)
        assert got.shape == ref.shape and int(got.max()) < int(idx.num_pages.max())
        same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got.flatten(0, 1), ref.flatten(0, 1)))
        assert same >= 0.98 * ref.numel()  # float32 sums in another order may swap near-equal pages



@pytest.mark.parametrize("preset", ["exact-topk", "icecache"])
def test_deferred_insertion_on_cuda_attends_every_token_once(preset):
    """Insertions deferred past the next steps (own stream, events both ways, the page attended from the window
    meanwhile): at an unlimited budget the tokens are dense decoding's, with the lazy and the real worker."""
    from kvpolicy.policy import Policy
    from tests.test_prefill_job import _deferred_generate, _LazyExecutor

    model = tiny_model("llama", layers=6).cuda()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(8)).cuda()
    dense = model.generate(ids, max_new_tokens=40, do_sample=False)[:, 300:]
    pol = Policy.from_config({**Policy.preset(preset, budget=None).to_config(), "dense_layers": [0]})
    for executor, slow in ((_LazyExecutor(), 0.0), (None, 0.005)):
        out, st = _deferred_generate(model, ids, pol, 40, executor=executor, slow_add_s=slow)
        assert torch.equal(out, dense)
        assert st["pages_inserted"] == st["layers"] * 3 and st["deferred_steps"] > 0  # 300 + 40 tokens: 3 pages


def test_deferred_insertion_with_captured_steps_on_cuda():
    """Captured steps beside queued insertions: every page still reaches the index, and greedy decoding stays
    close to the eager cache's (the steps that select before an insertion lands differ by timing)."""
    from kvpolicy.policy import Policy
    from tests.test_prefill_job import _deferred_generate

    model = tiny_model("llama", layers=6).cuda()
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(9)).cuda()
    base = Policy.resolve_placed("icecache@cuda:uva", budget=128)
    pol = Policy.from_config({**base.to_config(), "dense_layers": [0]})
    ref = KVPolicyCache(model, pol)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(ref), max_new_tokens=48, do_sample=False)
    model.set_attn_implementation("sdpa")
    import os

    os.environ["KVPOLICY_DECODE_GRAPHS"] = "1"
    try:
        out, st = _deferred_generate(model, ids, pol, 48, slow_add_s=0.002)
    finally:
        os.environ.pop("KVPOLICY_DECODE_GRAPHS")
    assert out.shape == (1, 48)
    assert st["pages_inserted"] == ref.stats()["pages_inserted"] > 0 and st["deferred_steps"] > 0


def test_registered_host_memory_is_pinned_and_reaches_the_gpu(monkeypatch):
    """``pinned_empty`` page-locks ordinary memory in place (cudaHostRegister): pinned, copied asynchronously,
    read by a Triton kernel through its host address, and unregistered when the last view is gone."""
    import gc

    from kvpolicy.host_memory import PIN_ENV

    monkeypatch.setenv(PIN_ENV, "register")

    from kvpolicy_kernels.page_load import load_pages

    from kvpolicy.host_memory import pinned_empty
    from kvpolicy.pool import PagePool
    from kvpolicy.types import PAD

    t = pinned_empty((3, 1000, 64), torch.bfloat16)
    assert t.is_pinned() and t.shape == (3, 1000, 64) and t.dtype == torch.bfloat16
    t.copy_(torch.randn(3, 1000, 64).to(torch.bfloat16))
    d = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t)
    # a tracked (index-backing) pool now sits in registered memory: the UVA page loader reads it directly
    src = PagePool(1, 2, 16, 64, dtype=torch.bfloat16, capacity=6)
    assert src.k.is_pinned() and src.v.is_pinned()
    src.k.copy_(torch.randn(src.k.shape).to(torch.bfloat16))
    src.v.copy_(torch.randn(src.v.shape).to(torch.bfloat16))
    src.lengths.fill_(16)
    dst = PagePool(1, 2, 16, 64, dtype=torch.bfloat16, device="cuda", capacity=3, pin=False, track_tokens=False)
    ids = torch.tensor([[[5, 0, PAD], [2, 3, 4]]], device="cuda")
    slots = torch.tensor([[[0, 2, PAD], [1, 0, 2]]], device="cuda")
    load_pages(src.k, src.v, src.lengths, ids, slots, dst.k, dst.v, dst.lengths)
    torch.cuda.synchronize()
    assert torch.equal(dst.k[0, 0, 0].cpu(), src.k[0, 0, 5]) and torch.equal(dst.v[0, 1, 2].cpu(), src.v[0, 1, 4])
    del t, d, src
    gc.collect()
    again = pinned_empty((1 << 20,), torch.uint8)  # registration after unregistration works
    assert again.is_pinned()


@pytest.mark.parametrize("transfer", ["uva", "bulk_load"])
@pytest.mark.parametrize("index_device", ["cpu", "cuda"])
def test_prefetched_followers_on_cuda_match_eager(transfer, index_device):
    """``prefetch="follow"``: the followers' pages are selected, reserved and copied on a side stream right after
    their anchor selects; decoding generates what it does without prefetch, every follower step used its
    prefetch, and no reservation is left pinned."""
    from kvpolicy.policy import Policy

    model = tiny_model("llama", layers=8).cuda()  # anchors 2, 5; followers 3, 4, 6, 7
    ids = torch.randint(0, 128, (2, 700), generator=torch.Generator().manual_seed(5)).cuda()
    pol = Policy.resolve_placed(f"icecache-reuse@{index_device}:{transfer}", budget=128)
    outs, caches = _decode_each(model, ids, pol, 48, [{"prefetch": m} for m in ("off", "follow", "estimate")])
    assert torch.equal(outs[0], outs[1])
    assert outs[2].shape == outs[0].shape  # the estimate changes anchor 5's pages: tokens may differ
    for cache in caches[1:]:
        followers = {f for fs in cache.followers.values() for f in fs}
        for i in cache.policy_layers:
            st = cache.layers[i].state
            st.wait_ready()
            assert st.stats.pages_inserted > 0
            assert int(st.allocator._pins.sum()) == 0
            if i in followers:
                assert st.stats.prefetched_steps == st.stats.steps == 47
    assert caches[2].layers[5].state.stats.prefetched_steps == 47  # estimated from layer 4's attention input


@pytest.mark.parametrize("pool_dtype", ["auto", "fp8"])
def test_index_reading_the_pool_decodes_as_its_own_key_copy(pool_dtype):
    """``icecache-bounded`` (``keys_in_pool``: the index scores pages from the pinned CPU pool's chunks in place,
    no key copy) generates what the same policy with the index's own pinned key copy generates, across window
    flushes and insertions (splits, re-projections read back from the pool). With an fp8 pool both score the
    keys they hold, so only the bf16 pool is compared token for token; the fp8 one must decode and hold no keys."""
    from kvpolicy.policy import Policy

    if pool_dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversions need compute capability 8.9")
    model = tiny_model("llama", layers=4).cuda()
    ids = torch.randint(0, 128, (1, 900), generator=torch.Generator().manual_seed(6)).cuda()
    base = Policy.resolve_placed("icecache-bounded@cuda:uva", budget=128).to_config()
    outs, idx_bytes = [], []
    for in_pool in (True, False):
        cfg = {**base, "index": {**base["index"], "keys_in_pool": in_pool}, "cpu_pool_dtype": pool_dtype}
        pol = Policy.from_config({**cfg, "dense_layers": [0]})
        cache = KVPolicyCache(model, pol)
        with torch.inference_mode():
            outs.append(model.generate(ids, **cache_kwargs(cache), max_new_tokens=64, do_sample=False))
        states = [cache.layers[i].state for i in cache.policy_layers]
        assert all((s.index._keys is None) == in_pool for s in states)
        assert all(s.index._pool is (s.kv.cpu_pool if in_pool else None) for s in states)
        for s in states:
            s.index.validate()
        idx_bytes.append(sum(s.index.nbytes for s in states))
        assert cache.stats()["pages_inserted"] > 0
    model.set_attn_implementation("sdpa")
    if pool_dtype == "auto":
        assert torch.equal(outs[0], outs[1])
    assert idx_bytes[0] < idx_bytes[1] / 2  # the key copy was most of the index
