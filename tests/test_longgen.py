"""``kvpolicy eval --task longgen``: agreement and KL against the full cache over a long teacher-forced generation.

A random-weight llama with SmolLM2's vocabulary stands in for the model (the pipeline, not accuracy, is tested)."""

from __future__ import annotations

import math

import pytest

from kvpolicy.cli import main
from kvpolicy.eval.longgen import binned, curve_bin, longgen_row, longgen_sample
from kvpolicy.eval.report import markdown_report, plot_report
from kvpolicy.eval.runner import EvalJob, read_rows, run_eval
from kvpolicy.eval.tasks import resolve_tasks
from kvpolicy.policy import Policy
from tests.conftest import needs_long_context_eval, smollm_tokenizer, tiny_llama_for

pytestmark = needs_long_context_eval

N = 40  # generated tokens: crosses two window flushes at page size 16


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_for(tok, 4)


@pytest.fixture(scope="module")
def sample(model, tok):
    return longgen_sample(model, tok, 300, N, seed=0)


KW = dict(model_name="tiny", policies=["full", "quest", "snapkv"], budgets=[64], tasks=["longgen"], lengths=[300],
          samples=1, progress=False, longgen_tokens=N)


def test_curve_bins():
    assert [curve_bin(n) for n in (1, 40, 256, 1024, 2048)] == [1, 2, 16, 64, 64]
    assert binned([1, 0, 1, 1, 0], 2) == [0.5, 1.0, 0.0]


def test_reference_is_greedy_and_its_own_log_probs(sample):
    assert sample.prompt.shape == (1, 300) and sample.tokens.shape == (1, N)
    assert sample.logp.shape[0] == N and sample.logp.device.type == "cpu"
    assert (sample.logp.argmax(-1) == sample.tokens[0]).all()  # greedy (no EOS was the argmax here)
    assert sample.logp.exp().sum(-1).sub(1).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["full", "icecache", "quest", "h2o"])
def test_unlimited_budget_agrees_with_the_full_cache(model, sample, name):
    """At an unlimited budget every policy (dense prefill handed over, or its own for h2o) reproduces the full
    cache's decode: top-1 agreement 1 and KL ~0 at every position, pages written during decoding included."""
    row = longgen_row(model, sample, EvalJob(name, None, Policy.preset(name, budget=None)))
    assert row["agreement"] == 1.0 and row["agreement_last_quarter"] == 1.0 and row["first_disagreement"] is None
    assert row["kl_max"] < 1e-5 and row["first_token"] == "dense_prefill"
    assert len(row["agreement_curve"]) == len(row["kl_curve"]) == math.ceil(N / row["curve_bin"]) == 20


def test_small_budget_drifts_and_row_fields(model, sample):
    row = longgen_row(model, sample, EvalJob("quest", 64, Policy.preset("quest", budget=64)))
    assert row["generated_tokens"] == N and row["length"] == 300 and row["budget_tokens"] == 64
    assert 0 <= row["agreement"] < 1 and row["kl"] > 0 and row["first_disagreement"] >= 1  # position 0 is dense
    assert row["agreement_curve"][0] >= 0.5  # the first bin holds position 0, which always agrees
    assert row["policy_config"]["selector"]["name"] == "quest" and "score" not in row
    assert 0 < row["reference_distinct_4grams"] <= 1 and isinstance(row["reference_text"], str)


def test_rows_resume_report_and_plot(model, tok, tmp_path):
    out = tmp_path / "lg.jsonl"
    rows = run_eval(model, tok, out=out, **KW)
    assert {(r["policy"], r["budget_tokens"]) for r in rows} == {("full", None), ("quest", 64), ("snapkv", 64)}
    assert all(r["task"] == "longgen" and r["first_token"] == "dense_prefill" and r["dtype"] == "float32"
               for r in rows)  # snapkv-qhidden has no question here: not run
    assert run_eval(model, tok, out=out, **KW) == []  # resumed
    with pytest.raises(ValueError, match="holds longgen rows of \\[40\\] generated tokens"):
        run_eval(model, tok, out=out, **{**KW, "longgen_tokens": 32})
    md = markdown_report(read_rows(out))
    assert "Long generation" in md and "| tiny | 300 | 40 | full | all | 1 | 100.0 |" in md
    paths = plot_report(read_rows(out), tmp_path / "plots")
    assert [p.name for p in paths] == ["tiny_longgen_300_40_budget64.png"] and paths[0].stat().st_size > 1000


def test_bad_input(model, tok, tmp_path):
    assert resolve_tasks("passkey,longgen") == ["passkey", "longgen"]
    with pytest.raises(ValueError, match="positive"):
        run_eval(model, tok, out=tmp_path / "x.jsonl", **{**KW, "longgen_tokens": 0})
    with pytest.raises(ValueError, match="beyond the model's context"):
        run_eval(model, tok, out=tmp_path / "x.jsonl", **{**KW, "longgen_tokens": 4000})
    with pytest.raises(ValueError, match="longgen has no question"):
        longgen_row(model, None, EvalJob("snapkv+qafter", 64, Policy.preset("snapkv", budget=64),
                                         question_after=True))
    with pytest.raises(SystemExit) as e:  # argparse refuses it
        main(["eval", "--task", "longgen", "--longgen-tokens", "0", "--out", str(tmp_path / "o.jsonl")])
    assert e.value.code == 2
