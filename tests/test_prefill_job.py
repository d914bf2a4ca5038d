"""The prefill job (index build, pool write, selector prepare): background overlap, prompt queries, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache
from kvpolicy.policy import Policy
from kvpolicy.reference.exact_index import ExactIndex
from kvpolicy.reference.oracle_selector import OracleSelector
from kvpolicy.registry import Registry
from kvpolicy.testing import _single_plugin


def _generate(model, ids, policy, n=24, **kw):
    cache = KVPolicyCache(model, policy, **kw)
    try:
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False)
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
        tiny_llama(torch.randint(0, 128, (1, 200)), **cache_kwargs(dense), use_cache=True)
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


class _LazyExecutor:
    """Runs a job only when its result is asked for: every deferred insertion then waits until the window is
    full, deterministically."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        orig = fut.result

        def result(timeout=None):
            if not fut.done():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 (re-raised by the future)
                    fut.set_exception(e)
            return orig(timeout)

        fut.result = result
        return fut


def _deferred_generate(model, ids, policy, n, executor=None, slow_add_s=0.0):
    import time

    cache = KVPolicyCache(model, policy, defer_insert=True)
    if executor is not None:
        cache.build_executor = executor
    for i in cache.policy_layers:
        index = cache.layers[i].state.index
        add = index.add

        def slow(keys, add=add):
            time.sleep(slow_add_s)
            return add(keys)

        index.add = slow
    try:
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    st = cache.stats()
    st["layers"] = len(cache.policy_layers)
    return out[:, ids.shape[1]:], st


@pytest.mark.parametrize("preset", ["exact-topk", "icecache"])
def test_deferred_insertion_attends_every_token_once(tiny_llama, preset):
    """At an unlimited budget every token must be attended exactly once, also while a page is in transit (in
    the window, not yet in the index) and right after its insertion lands: the tokens equal dense decoding."""
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(6))
    dense = tiny_llama.generate(ids, max_new_tokens=40, do_sample=False)[:, ids.shape[1]:]
    out, st = _deferred_generate(tiny_llama, ids, Policy.preset(preset, budget=None), 40, executor=_LazyExecutor())
    assert torch.equal(out, dense)
    # lazy jobs: each insertion waits while the extra window page fills (16 steps), in every policy layer; the
    # last insertion of each layer is cut short by the end of generation
    n = st["layers"]
    assert st["pages_inserted"] == n * 2 and n * 16 < st["deferred_steps"] < n * 2 * 16
    out, st = _deferred_generate(tiny_llama, ids, Policy.preset(preset, budget=None), 40, slow_add_s=0.01)
    assert torch.equal(out, dense)  # a real worker thread, insertions slower than steps
    assert st["pages_inserted"] == n * 2
    if n > 1:  # with one policy layer the worker starts each job at once, and the next step joins it
        assert st["deferred_steps"] > 0


def test_deferred_insertion_matches_inline_when_each_job_is_joined_at_once(tiny_llama):
    """At a limited budget, deferral changes only when a page enters the index: with jobs joined before the
    next step (the default) the cache is the inline one."""
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(7))
    pol = Policy.preset("exact-topk", budget=96)
    inline, _ = _generate(tiny_llama, ids, pol, n=40, overlap=False)
    deferred, st = _deferred_generate(tiny_llama, ids, pol, 40, executor=_LazyExecutor())
    assert st["deferred_steps"] > 0 and st["pages_inserted"] > 0
    assert deferred.shape == inline.shape


def test_deferred_insertion_refuses_layer_reuse_and_inline_jobs(tiny_llama):
    reuse = Policy.from_config({"preset": "icecache-reuse", "budget": 128, "dense_layers": [],
                                "selector": {"name": "icecache", "reuse": True, "first_anchor": 0}})
    with pytest.raises(ValueError, match="layer reuse"):
        KVPolicyCache(tiny_llama, reuse, defer_insert=True)
    with pytest.raises(ValueError, match="overlap=True"):
        KVPolicyCache(tiny_llama, Policy.preset("icecache", budget=128), defer_insert=True, overlap=False)
    tiny_llama.set_attn_implementation("sdpa")


def test_job_queue_runs_unranked_jobs_first_then_the_highest_rank():
    import threading

    from kvpolicy.concurrency import JobQueue

    q, order, gate = JobQueue(), [], threading.Event()
    rank = {"a": 1, "b": 5, "c": 3}
    q.submit(gate.wait)  # holds the worker until everything is queued
    futs = [q.submit_ranked(lambda n=n: rank[n], order.append, n) for n in "abc"]
    futs.append(q.submit(order.append, "fifo"))
    rank["a"] = 9  # ranks are read when the worker chooses, not when a job is queued
    gate.set()
    for f in futs:
        f.result(timeout=5)
    assert order == ["fifo", "a", "b", "c"]
    q.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        q.submit(print)


def test_job_queue_hands_errors_to_the_joiner():
    from kvpolicy.concurrency import JobQueue

    q = JobQueue()
    fut = q.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(timeout=5)
    assert q.submit(lambda: 7).result(timeout=5) == 7
    q.shutdown()


def test_a_failing_deferred_insertion_surfaces_at_its_join(tiny_llama):
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(10))
    cache = KVPolicyCache(tiny_llama, Policy.preset("exact-topk", budget=None), defer_insert=True)
    cache.build_executor = _LazyExecutor()

    def fail(keys):
        raise FloatingPointError("insertion failed on purpose")

    for i in cache.policy_layers:
        cache.layers[i].state.index.add = fail
    try:
        with pytest.raises(FloatingPointError, match="on purpose"):
            tiny_llama.generate(ids, **cache_kwargs(cache), max_new_tokens=40, do_sample=False)
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    st = cache.layers[cache.policy_layers[0]].state
    assert st.stats.deferred_steps > 0  # the failure waited, deferred, until the window was full
