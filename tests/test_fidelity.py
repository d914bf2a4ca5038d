"""Teacher-forced perplexity under a policy (``kvpolicy.eval.fidelity.policy_nll``) against a plain dense forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.eval.ablate import selection_metrics
from kvpolicy.eval.fidelity import policy_nll
from kvpolicy.eval.runner import EvalJob
from kvpolicy.hf import KVPolicyCache
from kvpolicy.policy import Policy
from kvpolicy.types import PageLayout, Selection
from tests.conftest import tiny_model

PROMPT, CONT = 160, 40  # the continuation crosses two window flushes at page size 16


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, PROMPT + CONT))
    with torch.inference_mode():
        logits = model(ids).logits[0, PROMPT - 1 : -1].float()  # one plain dense forward
        dense_nll = torch.nn.functional.cross_entropy(logits, ids[0, PROMPT:], reduction="none").tolist()
    return model, ids, dense_nll


def _nll(model, ids, name: str, budget: int | None, **over):
    job = EvalJob(name, budget, Policy.preset(name, budget=budget, **over))
    with torch.inference_mode():
        dense = DynamicCache(config=model.config)
        first = model(ids[:, :PROMPT], **cache_kwargs(dense), use_cache=True).logits[:, -1]
    return policy_nll(model, ids, PROMPT, job, dense, first)


def test_dense_nll_equals_plain_forward(setup):
    model, ids, dense_nll = setup
    assert policy_nll(model, ids, PROMPT, None) == pytest.approx(dense_nll, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", ["full", "oracle", "quest", "pqcache", "magicpig", "icecache"])
def test_unlimited_budget_nll_equals_dense(setup, name):
    """Every policy with an unlimited budget (and ``full``) decodes the continuation exactly as a dense forward:
    positions, RoPE, window flushes and page insertion of the continuation tokens are right."""
    model, ids, dense_nll = setup
    assert _nll(model, ids, name, None) == pytest.approx(dense_nll, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", ["pqcache", "magicpig", "quest", "oracle"])
def test_budgeted_policies_read_no_more_than_their_budget(setup, name):
    """Under a token budget, token-level policies (page size 1) retrieve at most budget - sink - window tokens per
    step: they are not secretly reading every page during the perplexity decode."""
    model, ids, _ = setup
    pol = Policy.preset(name, budget=128)
    b = pol.resolve_budget()
    with torch.inference_mode():
        cache = KVPolicyCache(model, pol)
        model(ids[:, :PROMPT], **cache_kwargs(cache), use_cache=True)
        for t in range(8):
            model(ids[:, PROMPT + t : PROMPT + t + 1], **cache_kwargs(cache), use_cache=True)
    for i in cache.policy_layers:
        st = cache.layers[i].state
        assert st.budget.retrieved_pages == b.retrieved_pages
        B, H, _ = st.shape
        assert st.stats.pages_selected <= st.stats.steps * B * H * b.retrieved_pages


def test_mass_captured_compares_page_sizes():
    """``mass_captured`` is absolute: selecting everything gives 1; ``mass_recall`` is relative to the layout."""
    torch.manual_seed(0)
    B, H, G, L, D, n_sink = 1, 2, 2, 40, 8, 4
    q, k, v = torch.randn(B, H * G, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    n_mid = 32
    tids = torch.arange(n_mid).view(1, 1, n_mid, 1).expand(B, H, n_mid, 1)  # page size 1: token i = page i
    layout = PageLayout(page_ids=torch.arange(n_mid).expand(B, H, n_mid), token_ids=tids.contiguous(),
                        lengths=torch.ones(B, H, n_mid, dtype=torch.int32), num_pages=torch.full((B, H), n_mid),
                        num_tokens=n_mid)
    every = selection_metrics(q, k, v, 1.0, n_sink, layout, Selection(page_ids=torch.arange(n_mid).expand(B, H, n_mid)))
    assert every["mass_captured"] == pytest.approx(1.0) and every["rel_out_error"] < 1e-5
    none = selection_metrics(q, k, v, 1.0, n_sink, layout, Selection(page_ids=torch.full((B, H, 1), -1)))
    assert 0 < none["mass_captured"] < 1
    some = selection_metrics(q, k, v, 1.0, n_sink, layout, Selection(page_ids=torch.arange(4).expand(B, H, 4)))
    assert none["mass_captured"] < some["mass_captured"] < 1


def test_omnikv_followers_reuse_the_filter_ranking_of_the_same_step(monkeypatch):
    """OmniKV in real decoding: layers before the first filter layer and the filter layers read every page, in
    ranking order for the filters; each following layer attends to the first ``budget`` pages of the ranking its
    filter layer made at the same step (never a stale or empty one)."""
    import kvpolicy.layer as layer_mod

    model = tiny_model("llama", layers=6)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, PROMPT + CONT))
    pol = Policy.preset("omnikv", budget=96, selector={"name": "omnikv", "filter_layers": [1, 3]})
    seen: dict[int, dict[int, torch.Tensor]] = {}
    decode = layer_mod.PolicyLayer.decode

    def spy(self, *args, **kw):
        step = self.step
        out = decode(self, *args, **kw)
        seen.setdefault(step, {})[self.layer_idx] = self.last_selection.page_ids.clone()
        return out

    monkeypatch.setattr(layer_mod.PolicyLayer, "decode", spy)
    with torch.inference_mode():
        cache = KVPolicyCache(model, pol)
        model(ids[:, :PROMPT], **cache_kwargs(cache), use_cache=True)
        for t in range(CONT):
            model(ids[:, PROMPT + t : PROMPT + t + 1], **cache_kwargs(cache), use_cache=True)
    k = pol.resolve_budget().retrieved_pages
    assert sorted(seen) == list(range(CONT))
    for step, sel in seen.items():
        assert sel[0].shape[-1] == sel[1].shape[-1] > k  # every page: layer 0 (before the filters), filter 1
        for follower, anchor in ((2, 1), (4, 3), (5, 3)):
            assert sel[follower].shape[-1] == k and bool((sel[follower] >= 0).all()), (step, follower)
            assert torch.equal(sel[follower], sel[anchor][..., :k]), (step, follower)
