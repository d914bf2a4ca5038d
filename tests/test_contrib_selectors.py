"""Baseline selectors (kvpolicy_contrib.selectors): exactness at unlimited budget, each method's defining
property (bounds, codes, hashes, votes, heavy hitters, layer reuse), presets and bad hyperparameters."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache
from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy
from kvpolicy.reference.mirror_index import MirrorIndex
from kvpolicy.testing import clustered_keys
from kvpolicy.types import PAD

BASELINES = ("quest", "arkvale", "pqcache", "magicpig", "omnikv", "snapkv", "h2o", "streaming_llm")


def _model(layers=6):
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


def _layer(selector, keys, values, *, budget, page_size=16, queries=None, layer=0, **kw):
    pol = Policy(selector=selector, index="exact", page_size=page_size, budget=budget, **kw)
    st = PolicyLayer(pol, layer, validate=True)
    st.prefill(keys, values, queries=queries)
    return st


def _exact_top_pages(q, keys, n_sink, S, k):
    """Pages (positional, after the sink) with the largest exact max q.k, per KV head; q: [B, Hq, D]."""
    mid = keys[:, :, n_sink:]
    B, H, T, D = mid.shape
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(B, H, -1, D), mid).amax(2)  # [B, H, T]
    P = T // S
    return s[..., : P * S].view(B, H, P, S).amax(-1).topk(k, dim=-1).indices


# ------------------------------------------------------------------ end to end on a model
@pytest.mark.parametrize("preset", ["quest", "arkvale", "pqcache", "magicpig", "omnikv", "h2o"])
def test_unlimited_budget_reproduces_dense(model, preset):
    ids = _ids(300)
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)[:, 300:]
    res = kvpolicy.generate(model, ids, policy=preset, budget=None, max_new_tokens=24, validate=True)
    assert torch.equal(res.token_ids, ref)


@pytest.mark.parametrize("preset", BASELINES)
@pytest.mark.parametrize("budget", [64, 256])
def test_presets_generate_within_budget(model, preset, budget):
    ids = _ids(700, seed=1)
    res = kvpolicy.generate(model, ids, policy=preset, budget=budget, max_new_tokens=20, validate=True)
    assert res.token_ids.shape == (1, 20)
    pol = Policy.preset(preset, budget=budget)
    b = pol.resolve_budget()
    assert b.tokens == budget
    n_layers = 6 - len(pol.dense_layers)
    if preset != "omnikv":  # omnikv's filter layers read every page
        assert res.stats["pages_selected"] <= 19 * n_layers * 2 * b.retrieved_pages


def test_streaming_llm_is_streaming_with_four_sink_tokens(model):
    ids = _ids(500, seed=2)
    a = kvpolicy.generate(model, ids, policy="streaming_llm", budget=128, max_new_tokens=12)
    b = kvpolicy.generate(model, ids, policy=Policy(selector="streaming", page_size=1, sink_pages=4, budget=128),
                          max_new_tokens=12)
    assert torch.equal(a.token_ids, b.token_ids)
    assert Policy.preset("streaming_llm", budget=128).resolve_budget().sink_tokens == 4


def test_omnikv_followers_reuse_the_filter_layers_ranking(model):
    ids = _ids(600, seed=3)
    pol = Policy.preset("omnikv", budget=128, selector={"name": "omnikv", "filter_layers": (1, 4)})
    cache = KVPolicyCache(model, pol)
    with torch.inference_mode():
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("sdpa")
    st = {i: cache.layers[i].state for i in cache.policy_layers}
    k = pol.resolve_budget().retrieved_pages
    for full in (0, 1, 4):  # before the first filter layer, and the filter layers: every page
        assert st[full].budget.unlimited
        ids = st[full].last_selection.page_ids  # chosen before the step's window page was inserted
        n = int(st[full].index.num_pages.min()) - st[full].stats.pages_inserted % 1  # pages at the last step
        assert sorted(ids[0, 0].tolist()) == list(range(ids.shape[-1])) and ids.shape[-1] in (n, n - 1)
    for follower, filt in ((2, 1), (3, 1), (5, 4)):
        assert isinstance(st[follower].index, MirrorIndex) and st[follower].index.anchor is st[filt]
        assert torch.equal(st[follower].last_selection.page_ids, st[filt].last_selection.page_ids[..., :k])
    # shared_heads: both KV heads of a filter layer get the same pages
    sel = st[1].last_selection.page_ids
    assert torch.equal(sel[:, 0], sel[:, 1])


# ------------------------------------------------------------------ page digests: quest, arkvale
def test_quest_bound_is_an_upper_bound_and_recalls_the_top_pages():
    from kvpolicy_contrib.selectors._digests import box_upper_bound

    keys = clustered_keys(B=1, H=2, T=16 * 40, D=32, seed=5)
    st = _layer("quest", keys, keys.clone(), budget=128)  # 4 retrieved pages
    P = int(st.index.num_pages.max())
    g = torch.Generator().manual_seed(6)
    hits = []
    for _ in range(20):
        q = keys[:, :, int(torch.randint(40, 600, (1,), generator=g))].repeat_interleave(2, 1)
        q = q + 0.5 * torch.randn(q.shape, generator=g)
        ub = box_upper_bound(q.view(1, 2, 2, 32), st.selector.digests, P)  # [1, 2, 2, P]
        exact = st.index.page_scores(q).view(1, 2, 2, P)
        assert bool((ub >= exact - 1e-4).all())
        sel = st.selector.select(q, st.context()).page_ids
        top = st.index.search(q, 4).page_ids
        hits += [len(set(sel[0, h].tolist()) & set(top[0, h].tolist())) / 4 for h in range(2)]
    # measured 0.33 here (loose boxes: 16 keys in 32 dims); 4 random pages of ~36 would score about 0.11
    assert sum(hits) / len(hits) >= 0.25


@pytest.mark.parametrize("digest", ["cuboid_max", "cuboid_mean", "sphere_max"])
def test_arkvale_digests(digest):
    keys = clustered_keys(B=1, H=2, T=16 * 30, D=32, seed=7)
    st = _layer({"name": "arkvale", "digest": digest}, keys, keys.clone(), budget=256)
    q = keys[:, :, 40 + 16 * 9 + 3].repeat_interleave(2, dim=1) * 3  # query aligned with a key of page 9
    sel = st.selector.select(q, st.context())
    sel.validate(st.index.num_pages)
    assert sel.k == st.budget.retrieved_pages
    d = st.selector.digests
    # the sphere bound holds for every key of a page
    if digest == "sphere_max":
        P = int(st.index.num_pages.max())
        bound = st.selector.score(q.view(1, 2, 2, 32).float(), d, P)
        assert bool((bound >= st.index.page_scores(q).view(1, 2, 2, P) - 1e-4).all())


def test_digests_follow_added_pages():
    keys = clustered_keys(B=1, H=1, T=16 * 10, D=16, seed=8)
    st = _layer("quest", keys, keys.clone(), budget=None)
    n0 = int(st.index.num_pages.max())
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        st.decode(torch.randn(1, 2, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g),
                  torch.randn(1, 1, 1, 16, generator=g), scaling=0.25)
    n1 = int(st.index.num_pages.max())
    assert n1 > n0
    d = st.selector.digests
    pool_k = st.kv.cpu_pool.k[0, 0, :n1].float()  # [P, S, D]
    lens = st.kv.cpu_pool.lengths[0, 0, :n1]
    for p in range(n1):
        kk = pool_k[p, : int(lens[p])]
        assert torch.allclose(d.lo[0, 0, p], kk.amin(0)) and torch.allclose(d.hi[0, 0, p], kk.amax(0))


# ------------------------------------------------------------------ pqcache
def test_pqcache_with_a_centroid_per_token_is_exact():
    # 64 tokens, one sub-vector, 6 bits: k-means puts a centroid on every key, so the scores are exact
    keys = torch.randn(1, 1, 16 + 64 + 8, 8, generator=torch.Generator().manual_seed(0))  # 64 offloaded
    st = _layer({"name": "pqcache", "subvectors": 1, "bits": 6, "kmeans_iters": 50}, keys, keys.clone(),
                budget=16 + 8 + 16, page_size=8, sink_pages=2, window_pages=2)
    sel = st.selector.select(q := torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(1)), st.context())
    exact = st.index.search(q, 1)
    assert sel.page_ids[0, 0, 0] == exact.page_ids[0, 0, 0]
    approx_table = st.selector.centroids[0, 0, 0]  # [ksub, D]
    codes = st.selector.codes[0, 0, : st.selector.n, 0]
    assert torch.allclose(approx_table[codes], keys[0, 0, 16:80], atol=1e-4)


def test_pqcache_encodes_decode_time_tokens_and_reports_bytes():
    keys = clustered_keys(B=1, H=2, T=800, D=32, seed=9)
    st = _layer("pqcache", keys, keys.clone(), budget=128)
    n0 = st.selector.n
    g = torch.Generator().manual_seed(2)
    for _ in range(33):
        st.decode(torch.randn(1, 4, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g),
                  torch.randn(1, 2, 1, 32, generator=g), scaling=32**-0.5)
    assert st.selector.n == st.index.num_tokens > n0
    # 2 sub-vectors x 6 bits = 12 bits -> 2 bytes per token and head, plus 2 x 64 x 16 float codebooks per head
    assert st.selector.nbytes == 2 * (2 * 64 * 16 * 4) + 2 * st.selector.n * 2


# ------------------------------------------------------------------ magicpig
def test_magicpig_samples_aligned_keys_and_never_opposite_ones():
    keys = torch.randn(1, 1, 16 + 16 * 20 + 16, 16, generator=torch.Generator().manual_seed(3))
    q = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(4))
    mean = keys[:, :, 16:-16].mean(2)
    keys[0, 0, 16 + 16 * 5 + 2] = mean[0, 0] + 5 * q[0, 0]  # same direction as q after centring: all tables collide
    keys[0, 0, 16 + 16 * 7 + 2] = mean[0, 0] - 5 * q[0, 0]  # opposite: never collides
    st = _layer({"name": "magicpig", "K": 8, "L": 40}, keys, keys.clone(), budget=16 * 21, sink_pages=1, window_pages=1)
    sel = st.selector.select(q, st.context())
    ids = sel.page_ids[0, 0].tolist()
    assert ids[0] == 5  # full collision count ranks first
    # the opposite key alone cannot put page 7 in the sample (other keys of page 7 may, rarely)
    mp = st.selector
    qh = mp._hash(q.float())
    opp = mp.codes[0, 0, 16 * 7 + 2]
    assert int((opp == qh[0, 0]).sum()) == 0
    # a budget of every page still loads only the sampled pages; an unlimited budget reads them all
    assert sel.k == st.budget.retrieved_pages == 19 and sel.valid.sum() < sel.k
    full = _layer({"name": "magicpig", "K": 8, "L": 40}, keys, keys.clone(), budget=None, sink_pages=1, window_pages=1)
    assert int(full.selector.select(q, full.context()).valid.sum()) == int(full.index.num_pages.max())


# ------------------------------------------------------------------ snapkv
def test_snapkv_votes_select_what_the_window_attends_and_stay_fixed():
    T, D = 16 + 16 * 30 + 32, 16
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 1, T, D, generator=g) * 0.1
    target = 16 + 16 * 12 + 4  # a token of page 12 of the index
    keys[0, 0, target] = torch.randn(D, generator=g)
    queries = torch.randn(1, 2, T, D, generator=g) * 0.1
    queries[0, :, -32:] = keys[0, 0, target] * 20  # the observation window looks at the target
    st = _layer("snapkv", keys, keys.clone(), budget=16 + 32 + 16 * 2, queries=queries, sink_pages=1, window_pages=2)
    sel0 = st.selector.select(torch.randn(1, 2, D), st.context())
    assert 12 in sel0.page_ids[0, 0].tolist()
    for _ in range(40):  # new pages never enter; the selection is the prefill's
        st.decode(torch.randn(1, 2, D, generator=g), torch.randn(1, 1, 1, D, generator=g),
                  torch.randn(1, 1, 1, D, generator=g), scaling=D**-0.5)
        assert torch.equal(st.last_selection.page_ids, sel0.page_ids)
    # question hidden: a window that ends before the looking queries no longer votes for the target
    st2 = _layer({"name": "snapkv", "obs_offset": 32}, keys, keys.clone(), budget=16 + 32 + 16 * 2, queries=queries,
                 sink_pages=1, window_pages=2)
    assert 12 not in st2.selector.select(torch.randn(1, 2, D), st2.context()).page_ids[0, 0].tolist()


# ------------------------------------------------------------------ h2o
def test_h2o_keeps_heavy_hitters_and_evicts_for_good():
    T, D, S = 16 + 4 * 40 + 8, 16, 4
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(1, 1, T, D, generator=g) * 0.1
    heavy = 16 + 4 * 3 + 1  # page 3 is a heavy hitter: every query attends to it
    keys[0, 0, heavy] = torch.ones(D)
    queries = torch.ones(1, 2, T, D) * 0.5 + 0.05 * torch.randn(1, 2, T, D, generator=g)
    budget = 16 + 8 + 4 * 6  # 6 retrieved pages of 4 tokens; recent part: 0.5 * 48 - 8 = 16 tokens = 4 pages
    st = _layer("h2o", keys, keys.clone(), budget=budget, page_size=S, queries=queries, sink_pages=4, window_pages=2)
    sel = st.selector.select(torch.ones(1, 2, D), st.context())
    kept0 = set(sel.page_ids[0, 0].tolist()) - {PAD}
    P = int(st.index.num_pages.max())
    assert 3 in kept0 and set(range(P - 4, P)) <= kept0 and len(kept0) == 6
    seen_evicted: set[int] = set()
    for _ in range(30):
        st.decode(torch.ones(1, 2, D) + 0.05 * torch.randn(1, 2, D, generator=g), torch.randn(1, 1, 1, D, generator=g),
                  torch.randn(1, 1, 1, D, generator=g), scaling=D**-0.5)
        kept = set(st.last_selection.page_ids[0, 0].tolist()) - {PAD}
        assert len(kept) <= 6 and 3 in kept  # the heavy hitter survives
        assert not (kept & seen_evicted)  # evictions are permanent
        seen_evicted |= kept0 - kept
        kept0 = kept


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("selector, field", [
    ({"name": "arkvale", "digest": "box"}, "digest"),
    ({"name": "pqcache", "bits": 12}, "bits"),
    ({"name": "magicpig", "K": 0}, "K"),
    ({"name": "magicpig", "min_collisions": 500}, "min_collisions"),
    ({"name": "omnikv", "filter_layers": ()}, "filter_layers"),
    ({"name": "snapkv", "kernel": 4}, "kernel"),
    ({"name": "h2o", "recent_ratio": 1.5}, "recent_ratio"),
])
def test_bad_hyperparameters_name_the_field(selector, field):
    with pytest.raises(ValueError, match=field):
        Policy(selector=selector, index="exact", budget=256)


def test_snapkv_without_prompt_queries_is_a_clear_error():
    keys = clustered_keys(B=1, H=1, T=300, D=16, seed=1)
    pol = Policy(selector="snapkv", index="exact", budget=128)
    with pytest.raises(ValueError, match="queries"):
        PolicyLayer(pol, 0).prefill(keys, keys.clone())


def test_pqcache_head_dim_must_split():
    keys = clustered_keys(B=1, H=1, T=300, D=16, seed=1)
    with pytest.raises(ValueError, match="subvectors"):
        _layer({"name": "pqcache", "subvectors": 3}, keys, keys.clone(), budget=128)
