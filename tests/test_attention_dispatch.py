"""The ``kvpolicy`` attention dispatch: shared model state is not switched per call (two threads, each with its
own cache, decode as they would alone), a hand-off nobody takes is an error, and every exit clears it."""

from __future__ import annotations

import threading

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache
from kvpolicy.layer import PolicyLayer
from tests.conftest import tiny_model


def test_two_threads_with_their_own_caches_get_their_sequential_tokens(monkeypatch):
    """Thread A starts decoding, thread B starts and decodes, A finishes and leaves, and only then does B go on (the
    interleaving is forced through a wrapped ``PolicyLayer.decode``). When each call switched the model's
    attention back on its way out, B's later steps ran without the policy (wrong tokens, no error)."""
    model = tiny_model("llama")
    ids_a = torch.randint(1, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    ids_b = torch.randint(1, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    want_a = kvpolicy.generate(model, ids_a, policy="exact-topk", budget=64, max_new_tokens=4).token_ids
    want_b = kvpolicy.generate(model, ids_b, policy="exact-topk", budget=64, max_new_tokens=24).token_ids
    b_started, a_done = threading.Event(), threading.Event()
    real = PolicyLayer.decode

    def decode(self, *args, **kwargs):
        name = threading.current_thread().name
        if name == "a" and self.step == 1:  # a is inside its generate: b starts and decodes up to its step 2
            assert b_started.wait(60), "thread b did not start"
        if name == "b" and self.step == 2:  # then a finishes and leaves, and only then does b go on
            b_started.set()
            assert a_done.wait(60), "thread a did not finish"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PolicyLayer, "decode", decode)
    got, errors = {}, []

    def run(name, ids, n):
        try:
            got[name] = kvpolicy.generate(model, ids, policy="exact-topk", budget=64, max_new_tokens=n).token_ids
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            if name == "a":
                a_done.set()

    threads = [threading.Thread(target=run, args=("a", ids_a, 4), name="a"),
               threading.Thread(target=run, args=("b", ids_b, 24), name="b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(got["a"], want_a) and torch.equal(got["b"], want_b)
    assert model.config._attn_implementation == "sdpa"  # switched back once both left


def test_a_hand_off_that_is_never_taken_is_an_error():
    """A cache built from the config, used without switching the attention, used to decode wrong tokens."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    cache = KVPolicyCache(model.config, "exact-topk", budget=64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="set_attn_implementation\\('kvpolicy'\\)"):
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=4, do_sample=False)


def test_the_hand_off_is_cleared_when_a_step_fails(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    want = kvpolicy.generate(model, ids, policy="exact-topk", budget=64, max_new_tokens=6).token_ids
    real = PolicyLayer.decode

    def fail(self, *a, **k):
        raise ValueError("injected failure")

    monkeypatch.setattr(PolicyLayer, "decode", fail)
    with pytest.raises(ValueError, match="injected"):
        kvpolicy.generate(model, ids, policy="exact-topk", budget=64, max_new_tokens=6)
    monkeypatch.setattr(PolicyLayer, "decode", real)
    assert model.config._attn_implementation == "sdpa"
    got = kvpolicy.generate(model, ids, policy="exact-topk", budget=64, max_new_tokens=6).token_ids
    assert torch.equal(got, want)
