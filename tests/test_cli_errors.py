"""Issue 20, item 5: every CLI error is one line and exit 2; ``eval`` results files: regular files only, one
writer at a time, failing cells exit non-zero and are replaced on rerun. Also ``generate``'s prompt checks."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.generation import generate
from tests.conftest import CharTokenizer, needs_long_context_eval, smollm_tokenizer, tiny_llama_for


def _one_line_error(capsys, cmd: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"kvpolicy {cmd}: error: "), err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("argv,needles", [
    (["generate", "--prompt-file", "{dir}"], ["--prompt-file", "is a directory"]),
    (["generate", "--prompt-file", "{dir}/missing.txt"], ["--prompt-file", "does not exist"]),
    (["eval", "--task-file", "{dir}", "--out", "{dir}/o.jsonl"], ["--task-file", "is a directory"]),
    (["eval", "--out", "{dir}"], ["--out", "must be a regular file path", "not a directory"]),
    (["generate", "--prompt", "hi", "--device", "tpu9"], ["unknown device 'tpu9'"]),
    (["generate", "--no-chat", "--prompt", ""], ["--prompt is empty"]),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),
    (["eval", "--samples", "-1", "--out", "{dir}/o.jsonl"], ["--samples must be at least 1, got -1"]),
    (["eval", "--budget", "64,-8", "--out", "{dir}/o.jsonl"], ["--budget must be at least 1, got -8"]),
    (["demo", "--length", "-5"], ["--length must be at least 1, got -5"]),
    (["demo", "--depths", "0.5,1.5"], ["--depths must lie in [0, 1], got 1.5"]),
    (["generate", "--prompt", "hi", "--budget", "-3"], ["--budget must be at least 1, got -3"]),
])
def test_bad_arguments_are_one_line_exit_2_before_any_model_loads(argv, needles, tmp_path, capsys, monkeypatch):
    import kvpolicy.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, argv[0], *needles)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_out_must_not_be_a_special_file(capsys, monkeypatch):
    import kvpolicy.cli as cli
    from kvpolicy.eval.runner import read_rows

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert main(["eval", "--out", "/dev/full"]) == 2
    _one_line_error(capsys, "eval", "--out '/dev/full' must be a regular file path", "not a regular file")
    with pytest.raises(ValueError, match="must be a regular file, not a special file"):
        read_rows("/dev/full")  # used to read zeros until memory ran out


def test_eval_length_must_be_positive(capsys, tmp_path, monkeypatch):
    import kvpolicy.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert main(["eval", "--length=-4k", "--out", str(tmp_path / "o.jsonl")]) == 2
    _one_line_error(capsys, "eval", "length '-4k' must be a positive number of tokens")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--samples", "many", "--out", "o.jsonl"])
    assert e.value.code == 2
    _one_line_error(capsys, "eval", "argument --samples: invalid int value: 'many'", "(see kvpolicy eval --help)")


def test_generate_refuses_a_list_of_prompts_and_an_empty_prompt(tiny_llama):
    with pytest.raises(TypeError, match="prompt must be one string, got list"):
        generate(tiny_llama, CharTokenizer(), ["ab", "cd"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the prompt is empty \(0 tokens\)"):
        generate(tiny_llama, CharTokenizer(), "", chat=False, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the prompt is empty \(0 tokens\)"):
        generate(tiny_llama, torch.empty((1, 0), dtype=torch.int64), max_new_tokens=2)


# ------------------------------------------------------------------ eval results file



@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_for(tok, 2)


EVAL = ["eval", "--policy", "full,quest", "--budget", "64", "--task", "niah_single_1", "--length", "600",
        "--samples", "1", "--model-name", "tiny"]


@pytest.fixture
def patched(model, tok, monkeypatch):
    """``_load`` returns the tiny model; every ``quest`` cell fails."""
    import kvpolicy.cli as cli
    import kvpolicy.eval.runner as runner

    real = runner._decode

    def decode(model, tokenizer, sample, job, dense, first):
        if job.label == "quest":
            raise RuntimeError("injected failure")
        return real(model, tokenizer, sample, job, dense, first)

    monkeypatch.setattr(cli, "_load", lambda args: (model, tok))
    monkeypatch.setattr(runner, "_decode", decode)


@needs_long_context_eval
def test_failing_cells_exit_non_zero_and_a_rerun_replaces_their_rows(patched, tmp_path, capsys):
    out = tmp_path / "sub" / "r.jsonl"
    for _ in range(2):
        assert main([*EVAL, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"kvpolicy eval: error: 1 of 2 cells failed (rows with 'error' in {out}; a rerun tries "
                           "them again)") or err[-1].startswith("kvpolicy eval: error: 1 of 1 cells failed")
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["policy"] for r in rows if "error" in r] == ["quest"]  # replaced, not appended
        assert [r["policy"] for r in rows if "error" not in r] == ["full"]


@needs_long_context_eval
def test_a_second_concurrent_writer_is_refused(patched, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.write_text("")
    with open(out, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another eval writing this file
        assert main([*EVAL, "--out", str(out)]) == 2
    _one_line_error(capsys, "eval", f"results file '{out}' is being written by another kvpolicy eval")
    assert out.read_text() == ""


def test_report_counts_a_duplicated_cell_once(tmp_path, capsys):
    row = {"model": "m", "task": "t", "length": 100, "sample": 0, "policy": "full", "budget_tokens": None,
           "seed": 0, "score": 1.0, "n": 1}
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [row, {**row, "score": 0.0}, {**row, "sample": 1}]))
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out 1 duplicate rows (same cell; the last one is kept)" in captured.err
    row = next(x for x in captured.out.splitlines() if x.startswith("| full | all |"))
    assert row.startswith("| full | all | 50.0 | 50.0 |") and row.endswith("| 2 |"), row  # was 66.7 over n=3
