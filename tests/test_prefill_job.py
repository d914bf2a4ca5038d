"""The prefill job (index build, pool write, selector prepare): background overlap, prompt queries, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from kvpolicy.hf import KVPolicyCache
from kvpolicy.policy import Policy
from kvpolicy.reference.exact_index import ExactIndex
from kvpolicy.reference.oracle_selector import OracleSelector
from kvpolicy.registry import Registry
from kvpolicy.testing import _single_plugin


def _generate(model, ids, policy, n=24, **kw):
    cache = KVPolicyCache(model, policy, **kw)
    try:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=n, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    return out[:, ids.shape[1]:], cache


def _registry_with(*classes) -> Registry:
    reg = Registry()  # the installed plugins, plus the test classes
    for cls in classes:
        reg.register(_single_plugin(cls), name=f"test-{cls.name}")
    return reg


@pytest.mark.parametrize("preset", ["exact-topk", "icecache-index", "icecache-reuse"])
def test_background_build_matches_inline(tiny_llama, preset):
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(4))
    pol = Policy.preset(preset, budget=128)
    inline, c1 = _generate(tiny_llama, ids, pol, overlap=False)
    overlap, c2 = _generate(tiny_llama, ids, pol, overlap=True)
    assert torch.equal(inline, overlap)
    s1, s2 = c1.stats(), c2.stats()
    assert s1["build_s"] > 0 and s2["build_s"] > 0
    assert s1["pages_inserted"] == s2["pages_inserted"] > 0 and s2["insert_work_s"] > 0
    assert s1["wait_s"] == 0  # inline: nothing to wait for


@dataclass(kw_only=True)
class _RecordingSelector(OracleSelector):
    name: ClassVar[str] = "test-recording"
    needs_prompt_queries: ClassVar[bool] = True
    seen: ClassVar[list] = []

    def prepare(self, keys, layout, ctx):
        type(self).seen.append((ctx.layer, tuple(ctx.prompt_queries.shape), ctx.index_offset, keys.shape[2]))


def test_prompt_queries_reach_prepare(tiny_llama):
    _RecordingSelector.seen.clear()
    reg = _registry_with(_RecordingSelector)
    pol = Policy(selector="test-recording", budget=96, registry=reg)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    _generate(tiny_llama, ids, pol, n=3)
    # 3 layers; tiny llama has 4 query heads of dim 16; 96 tokens = 6 pages (< 8): 1 sink + 1 window + 4
    # retrieved; sink 16 tokens; 184 left: the window keeps the partial 8, the index gets 11 pages (176 tokens)
    assert sorted(_RecordingSelector.seen) == [(i, (1, 4, 200, 16), 16, 176) for i in range(3)]


def test_prompt_query_selectors_refuse_a_dense_prefill(tiny_llama):
    from transformers import DynamicCache

    reg = _registry_with(_RecordingSelector)
    pol = Policy(selector="test-recording", budget=96, registry=reg)
    dense = DynamicCache(config=tiny_llama.config)
    with torch.inference_mode():
        tiny_llama(torch.randint(0, 128, (1, 200)), past_key_values=dense, use_cache=True)
    with pytest.raises(ValueError, match="needs the prompt's queries"):
        KVPolicyCache.from_dense(tiny_llama, pol, dense)
    tiny_llama.set_attn_implementation("sdpa")


@dataclass(kw_only=True)
class _FailingIndex(ExactIndex):
    name: ClassVar[str] = "test-failing"

    def build(self, keys, *, page_size):
        raise FloatingPointError("build failed on purpose")


def test_background_build_errors_surface_at_decode(tiny_llama):
    reg = _registry_with(_FailingIndex)
    pol = Policy(selector="index_topk", index="test-failing", budget=96, registry=reg)
    ids = torch.randint(0, 128, (1, 200))
    with pytest.raises(FloatingPointError, match="on purpose"):
        _generate(tiny_llama, ids, pol, n=3, overlap=True)


def test_background_jobs_wait_for_a_cuda_graph_capture():
    """A job never runs while the decode path holds ``capture_lock`` (a CUDA-graph capture is under way)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kvpolicy.concurrency import capture_lock
    from kvpolicy.layer import PolicyLayer

    layer = PolicyLayer(Policy.preset("exact-topk", budget=64), 0)
    layer.device = torch.device("cpu")
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as ex:
        layer.executor = ex
        with capture_lock:
            layer._run_job(started.set)
            assert not started.wait(0.3)  # held back while the "capture" holds the lock
        layer.wait_ready()
        assert started.is_set()
