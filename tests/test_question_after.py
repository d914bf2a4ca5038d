"""Where the first answer token comes from: ``first_token`` in every row, and the ``+qafter`` mode (kvpress's
setting), where a prefill-eviction policy compresses the context before the question is read.

A random-weight llama with SmolLM2's vocabulary stands in for the model (the pipeline, not accuracy, is tested)."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpolicy.eval.runner import eval_jobs, question_after_compression, question_start, run_eval
from kvpolicy.eval.tasks import make_sample
from kvpolicy.hf import KVPolicyCache
from kvpolicy.policy import Policy
from tests.conftest import needs_long_context_eval, smollm_tokenizer, tiny_llama_for

pytestmark = needs_long_context_eval


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_for(tok, 4)


@pytest.fixture(scope="module")
def sample(tok):
    return make_sample("passkey", tok, 600, seed=0)


def _dense_last_logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[:, -1].float()


def test_jobs_and_errors():
    jobs = eval_jobs(["snapkv+qafter", "h2o", "h2o+qafter"], [64])
    assert [(j.label, j.question_after, j.first_token) for j in jobs] == [
        ("snapkv+qafter", True, "policy"), ("h2o", False, "dense_prefill"), ("h2o+qafter", True, "policy")]
    assert all(j.own_prefill for j in jobs)  # snapkv+qafter alone adds no snapkv-qhidden
    with pytest.raises(ValueError, match="evict at prefill.*'quest' attends the whole prompt"):
        eval_jobs(["quest+qafter"], [64])
    with pytest.raises(ValueError, match="drop '-qhidden'"):
        eval_jobs(["snapkv-qhidden+qafter"], [64])
    with pytest.raises(ValueError, match="goes last"):
        eval_jobs(["snapkv+qafter+prefetch"], [64])
    with pytest.raises(ValueError, match="listed twice"):
        eval_jobs(["h2o+qafter", "h2o@cpu+qafter"], [64])


def test_question_start_errors(sample):
    import dataclasses

    assert 0 < question_start(sample) < sample.context_tokens
    with pytest.raises(ValueError, match="no question span"):
        question_start(dataclasses.replace(sample, question_span=None))
    with pytest.raises(ValueError, match="needs a context before it"):
        question_start(dataclasses.replace(sample, question_span=(0, 4)))


def test_the_context_is_compressed_before_the_question_is_read(model, sample, monkeypatch):
    """The prefill's one forward holds the context only; the question follows one token per forward."""
    widths = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        widths.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    ids = sample.input_ids()
    cut = question_start(sample)
    question_after_compression(model, KVPolicyCache(model, Policy.preset("snapkv", budget=64)), ids, cut)
    assert widths == [cut] + [1] * (ids.shape[1] - cut)


def test_first_token_comes_from_the_compressed_cache(model, sample):
    """At an unlimited budget H2O keeps everything, so reading the question after the context gives the dense
    prompt's logits; at 64 tokens the compressed cache gives other logits (SnapKV too), whereas the default mode
    hands every policy the dense prefill's."""
    ids = sample.input_ids()
    cut = question_start(sample)
    dense = _dense_last_logits(model, ids)
    unlimited = question_after_compression(model, KVPolicyCache(model, Policy.preset("h2o", budget=None)), ids, cut)
    torch.testing.assert_close(unlimited, dense, rtol=1e-4, atol=1e-4)
    for name in ("h2o", "snapkv"):
        small = question_after_compression(model, KVPolicyCache(model, Policy.preset(name, budget=64)), ids, cut)
        assert (small - dense).abs().max() > 1e-3, name


def test_rows_say_where_the_first_token_came_from(model, tok, tmp_path):
    rows = run_eval(model, tok, model_name="tiny", policies=["full", "quest", "snapkv", "snapkv+qafter"],
                    budgets=[64], tasks=["passkey"], lengths=[600], samples=1, out=tmp_path / "r.jsonl",
                    progress=False)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"full", "quest", "snapkv", "snapkv-qhidden", "snapkv+qafter"}
    for label, r in by.items():
        qafter = label == "snapkv+qafter"
        assert r["first_token"] == ("policy" if qafter else "dense_prefill"), label
        assert r["question_after_compression"] is qafter, label
    assert by["snapkv+qafter"]["policy_config"]["selector"].get("obs_offset", 0) == 0  # its prefill ends before the question
