"""``kvpolicy eval`` / ``kvpolicy report``: rows, resumption, determinism, both SnapKV modes, reports, CLI errors.

A random-weight llama with SmolLM2's vocabulary stands in for the model (the pipeline, not accuracy, is tested)."""

from __future__ import annotations

import json

import pytest

from kvpolicy.cli import main
from kvpolicy.eval.report import aggregate, markdown_report, plot_report
from kvpolicy.eval.runner import REQUIRED_KEYS, eval_jobs, read_rows, run_eval
from kvpolicy.policy import Policy
from tests.conftest import needs_long_context_eval, smollm_tokenizer, tiny_llama_for

pytestmark = needs_long_context_eval


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_for(tok, 4)


KW = dict(model_name="tiny", policies=["full", "quest", "snapkv"], budgets=[64], tasks=["niah_single_1"],
          lengths=[600], samples=2, progress=False)


def test_jobs_expand_full_once_and_snapkv_twice():
    labels = [(j.label, j.budget) for j in eval_jobs(["full", "quest", "snapkv"], [64, 128])]
    assert labels == [("full", None), ("quest", 64), ("quest", 128), ("snapkv", 64), ("snapkv", 128),
                      ("snapkv-qhidden", 64), ("snapkv-qhidden", 128)]
    with pytest.raises(ValueError, match="question-hidden"):
        eval_jobs(["quest-qhidden"], [64])
    with pytest.raises(Exception, match="unknown policy preset"):
        eval_jobs(["qest"], [64])


def test_placement_suffix_keeps_the_label_and_sets_the_parts():
    jobs = eval_jobs(["icecache@cpu:uva", "quest:sync"], [128])
    assert [(j.label, j.budget) for j in jobs] == [("icecache", 128), ("quest", 128)]
    cfg = jobs[0].policy.to_config()
    assert cfg["index"]["name"] == "dci_tree" and cfg["index"]["device"] == "cpu" and cfg["transfer"]["name"] == "uva"
    assert Policy.resolve_placed("icecache@cpu").transfer.name == "bulk_load"  # the preset's own transfer kept
    with pytest.raises(ValueError, match="listed twice"):
        eval_jobs(["icecache", "icecache@cpu"], [128])
    with pytest.raises(Exception, match="unknown transfer"):
        eval_jobs(["quest:nosuch"], [128])
    with pytest.raises(ValueError, match="unknown device"):
        eval_jobs(["quest@gpu0"], [128])


def test_prefetch_suffix_is_part_of_the_label(model, tok, tmp_path):
    jobs = eval_jobs(["icecache-reuse", "icecache-reuse+prefetch", "icecache@cpu+estimate"], [128])
    assert [(j.label, j.prefetch) for j in jobs] == [
        ("icecache-reuse", "off"), ("icecache-reuse+prefetch", "follow"), ("icecache+estimate", "estimate")]
    with pytest.raises(ValueError, match="choose one of"):
        eval_jobs(["icecache+estimate+prefetch"], [128])
    rows = run_eval(model, tok, out=tmp_path / "r.jsonl", **{
        **KW, "policies": ["icecache-reuse", "icecache-reuse+prefetch", "icecache+estimate"], "budgets": [128],
        "lengths": [900], "samples": 1})
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"icecache-reuse", "icecache-reuse+prefetch", "icecache+estimate"}
    assert by["icecache-reuse+prefetch"]["prediction"] == by["icecache-reuse"]["prediction"]  # exact
    assert by["icecache+estimate"]["policy_config"]["prefetch"] == "estimate"
    assert "prefetch" not in by["icecache-reuse"]["policy_config"]


def test_rows_resume_and_determinism(model, tok, tmp_path):
    out = tmp_path / "r.jsonl"
    rows = run_eval(model, tok, out=out, **KW)
    assert len(rows) == 2 * 4  # 2 samples x (full, quest, snapkv, snapkv-qhidden)
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r) and r["n"] == 1 and 0.0 <= r["score"] <= 1.0
        assert r["policy_config"]["selector"]["name"] in ("full", "quest", "snapkv")
        assert r["cpu_kv_bytes"] > 0 or r["policy"] == "full"
        assert r["dtype"] == "float32" and r["device"] == "cpu"
    hidden = [r for r in rows if r["policy"] == "snapkv-qhidden"]
    assert all(r["question_hidden"] and r["policy_config"]["selector"]["obs_offset"] > 0 for r in hidden)
    # resumption: nothing left to do; a torn last line is redone, and only it
    assert run_eval(model, tok, out=out, **KW) == []
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    redo = run_eval(model, tok, out=out, **KW)
    assert len(redo) == 1 and redo[0]["prediction"] == json.loads(lines[-1])["prediction"]  # deterministic
    assert len(read_rows(out)) == 8


def test_report_tables_and_plots(model, tok, tmp_path):
    out = tmp_path / "r.jsonl"
    rows = run_eval(model, tok, out=out, **KW)
    cells = aggregate(rows)
    assert cells[("tiny", 600, "niah_single_1", "full", None)][1] == 2
    md = markdown_report(rows)
    assert "| full | all |" in md and "| snapkv-qhidden | 64 |" in md and "niah_single_1" in md
    fake = [dict(r, length=1200) for r in rows] + rows  # a second length for the accuracy-vs-length plot
    fake.append({"model": "tiny", "policy": "quest", "budget_tokens": 64, "per_layer_head": [[0.5, 1.0], [0.2, 0.9]],
                 "layers": [0, 1]})
    paths = plot_report(fake, tmp_path / "plots")
    assert {p.name for p in paths} == {"tiny_accuracy_vs_budget.png", "tiny_accuracy_vs_length.png",
                                       "tiny_mass_recall_quest_64.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x"}\nnot json\n')
    assert main(["eval", "--task-file", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "bad.jsonl:2" in err and "no valid records" in err
    assert main(["eval", "--task", "niah_singel_1", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "niah_single_1" in capsys.readouterr().err  # the suggestion
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2


def test_fidelity_rows_and_report(model, tok, tmp_path):
    out = tmp_path / "f.jsonl"
    kw = dict(KW, policies=["full", "quest", "omnikv", "snapkv"], tasks=[], lengths=[600], fidelity=True,
              fidelity_queries=2, continuation=6)
    rows = run_eval(model, tok, out=out, **kw)
    by = {(r["policy"], r["budget_tokens"]): r for r in rows}
    assert set(by) == {("full", None), ("quest", 64), ("omnikv", 64), ("snapkv", 64), ("snapkv-qhidden", 64)}
    full = by[("full", None)]
    assert full["mass_recall"] == pytest.approx(1.0) and full["rel_out_error"] < 1e-4
    assert full["ppl"] == pytest.approx(full["ppl_full"], rel=1e-3)  # the full cache decodes like the dense one
    q = by[("quest", 64)]
    assert len(q["per_layer_head"]) == 4 and len(q["per_layer_head"][0]) == 2
    assert q["per_layer_head"][0] == [1.0, 1.0]  # layers 0-1 are dense in the quest preset
    assert 0 < q["mass_recall"] < 1.0 and q["rel_out_error"] > 0 and q["continuation_tokens"] == 6
    assert run_eval(model, tok, out=out, **kw) == []  # resumed: nothing left
    md = markdown_report(read_rows(out))
    assert "Attention fidelity" in md and "| tiny | 600 | quest | 64 |" in md


def test_progress_goes_to_a_log_one_line_per_row(model, tok, tmp_path, capsys):
    # not a terminal (pytest captures stdout): rich shows no live bar, so each finished row prints a line
    kw = {**KW, "progress": True, "samples": 1, "policies": ["full", "quest"]}
    rows = run_eval(model, tok, out=tmp_path / "r.jsonl", **kw)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert len(lines) == len(rows) == 2
    assert lines[-1].startswith("[2/2] niah_single_1 600 sample 0 quest @ 64: ")


def test_no_forward_returns_logits_for_the_whole_prompt(model, tok, tmp_path, monkeypatch):
    """The dense prefill and each policy's decode ask for the last position's logits only (the whole prompt's
    are T x vocab floats: 10 GB for 16k tokens of Qwen2.5 in float32)."""
    import functools

    widths = []
    forward = model.forward

    @functools.wraps(forward)  # generate() reads the signature (logits_to_keep)
    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        widths.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(model, "forward", spy)
    run_eval(model, tok, out=tmp_path / "r.jsonl", **{**KW, "samples": 1})
    assert widths and max(widths) == 1


def test_samples_default_to_five_and_differ(model, tok, tmp_path, monkeypatch):
    """``--samples`` defaults to 5, and the sample index seeds each sample: distinct needles (answers), keys
    (questions), depths and ids per sample, the same ones again on a rerun."""
    from kvpolicy.cli import build_parser
    from kvpolicy.eval import runner
    from kvpolicy.eval.tasks import make_sample

    # the samples are the point here, not the decoding (which other tests cover): skip generation
    monkeypatch.setattr(runner, "_decode", lambda *a: ("", {"device_kv": 0, "cpu_kv": 0, "index": 0}))

    assert build_parser().parse_args(["eval", "--out", "x.jsonl"]).samples == 5
    tasks = ["niah_single_1", "niah_multikey_2", "passkey"]
    kw = dict(model_name="tiny", policies=["full"], budgets=[64], tasks=tasks, lengths=[600], samples=5,
              progress=False, seed=3)
    rows = run_eval(model, tok, out=tmp_path / "r.jsonl", **kw)
    assert len(rows) == 15
    for task in tasks:
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["sample"])
        assert [r["sample"] for r in mine] == list(range(5))
        for field in ("sample_id", "depth"):
            assert len({r[field] for r in mine}) == 5, (task, field)
        assert len({tuple(r["answers"]) for r in mine}) == 5, task
        # the rows' samples are the ones make_sample builds from the sample index (keys in the question too)
        built = [make_sample(task, tok, 600, seed=3 * 1_000_003 + i) for i in range(5)]
        assert [s.id for s in built] == [r["sample_id"] for r in mine]
        questions = {tuple(s.prompt_ids[slice(*s.question_span)]) for s in built if s.question_span}
        assert len(questions) == 5 or task == "passkey", task  # passkey asks the same question of every sample
    again = run_eval(model, tok, out=tmp_path / "r2.jsonl", **kw)
    assert [(r["sample_id"], r["answers"]) for r in again] == [(r["sample_id"], r["answers"]) for r in rows]
