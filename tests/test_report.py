"""``kvpolicy report --common-tasks``: averages over the tasks every cell scored."""

from __future__ import annotations

import json

from kvpolicy.cli import main
from kvpolicy.eval.report import common_tasks, markdown_report


def _row(task, policy, budget, score, length=4096):
    return {"model": "m", "task": task, "length": length, "policy": policy, "budget_tokens": budget,
            "score": score, "n": 1}


ROWS = [
    _row("a", "full", None, 1.0), _row("b", "full", None, 1.0), _row("c", "full", None, 0.0),
    _row("a", "x", 64, 1.0), _row("b", "x", 64, 0.0), _row("c", "x", 64, 1.0),
    _row("a", "y", 64, 0.0), _row("b", "y", 64, 1.0),  # y never ran task c
    _row("a", "full", None, 1.0, length=8192), _row("a", "x", 64, 0.0, length=8192),  # complete at 8k
    {"model": "m", "task": "c", "length": 4096, "policy": "y", "budget_tokens": 64, "error": "OOM"},
]


def test_common_tasks_drops_the_tasks_a_cell_lacks_per_length():
    kept, dropped = common_tasks(ROWS)
    assert dropped == {("m", 4096): ["c"]}
    assert {(r["task"], r["length"]) for r in kept if "score" in r} == {("a", 4096), ("b", 4096), ("a", 8192)}
    md = markdown_report(kept)
    assert "*" not in md.split("`*` marks")[0]  # every average now covers the same tasks
    assert "| x | 64 | 100.0 | 0.0 | 50.0 | 50% |" in md  # (1 + 0) / 2 against full's (1 + 1) / 2


def test_report_cli_common_tasks_names_what_it_left_out(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["report", str(path), "--common-tasks"]) == 0
    err = capsys.readouterr().err
    assert "m at 4096 tokens: left out c" in err
