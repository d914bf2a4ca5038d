"""``kvpolicy report --split``: the gap from full to a policy split into budget, pages and search (issue 22, item 2)."""

from __future__ import annotations

import json

import pytest

from kvpolicy.cli import main
from kvpolicy.eval.report import page_oracle, split_markdown
from kvpolicy.eval.stats import chain_split


def _r(task, policy, budget, sample, score, page_size=16):
    return {"model": "m", "task": task, "length": 4096, "policy": policy, "budget_tokens": budget, "score": score,
            "n": 1, "sample": sample, "seed": 0, "policy_config": {"page_size": page_size}}


def _rows():
    rows = []
    for t in "ab":
        for i in range(4):
            rows += [_r(t, "full", None, i, 1.0)]
            for b in (64, 128):
                hi = b == 128
                rows += [_r(t, "oracle-token", b, i, 1.0 if hi or i < 3 else 0.0),
                         _r(t, "oracle-p16", b, i, 1.0 if hi or i < 2 else 0.0),
                         _r(t, "icecache", b, i, 1.0 if hi or i < 1 else 0.0)]
    return rows


def test_steps_add_up_to_the_total():
    res = chain_split(_rows(), ["full", "oracle-token", "oracle-p16", "icecache"])
    assert set(res) == {("m", 4096, 64), ("m", 4096, 128)}
    sp = res[("m", 4096, 64)]
    assert sp.pairs == 8 and [iv.mean for iv in sp.scores] == [1.0, 0.75, 0.5, 0.25]
    assert [iv.mean for iv in sp.steps] == pytest.approx([0.25, 0.25, 0.25])
    assert sp.total.mean == pytest.approx(0.75) and sum(iv.mean for iv in sp.steps) == pytest.approx(sp.total.mean)
    assert all(iv.lo < iv.mean < iv.hi for iv in sp.steps)  # 4 samples per task, not constant: some width
    at128 = res[("m", 4096, 128)]
    assert all(iv.mean == iv.lo == iv.hi == 0 for iv in (*at128.steps, at128.total))  # constant: zero width


def test_split_uses_only_samples_every_policy_scored():
    rows = [r for r in _rows() if not (r["policy"] == "oracle-token" and r["sample"] == 3)]
    sp = chain_split(rows, ["full", "oracle-token", "oracle-p16", "icecache"], budgets=[64])[("m", 4096, 64)]
    assert sp.pairs == 6 and sp.scores[0].n == 3
    assert [iv.mean for iv in sp.steps] == pytest.approx([0.0, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="'oracle-x' has no scored rows; policies in the rows: full, oracle-token"):
        chain_split(rows, ["full", "oracle-x", "icecache"])
    with pytest.raises(ValueError, match="at least two"):
        chain_split(rows, ["full"])


def test_page_oracle_follows_the_policy_page_size():
    rows = _rows()
    assert page_oracle(rows, "icecache", 64) == "oracle-p16"
    renamed = [{**r, "policy": "oracle"} if r["policy"] == "oracle-p16" else r for r in rows]
    assert page_oracle(renamed, "icecache", 64) == "oracle"  # `oracle` is the 16-token page oracle
    auto = rows + [_r("a", "pauto", 64, 0, 1.0, page_size="auto"), _r("a", "pauto", 128, 0, 1.0, page_size="auto")]
    assert page_oracle(auto, "pauto", 64) is None  # auto at 64 tokens: pages of 4, no oracle-p4 rows
    auto += [_r("a", "oracle-p4", 64, 0, 1.0), _r("a", "oracle-p8", 128, 0, 1.0)]
    assert (page_oracle(auto, "pauto", 64), page_oracle(auto, "pauto", 128)) == ("oracle-p4", "oracle-p8")
    with pytest.raises(ValueError, match="no page-level oracle for 'icecache' at 64 tokens"):
        split_markdown([r for r in rows if r["policy"] != "oracle-p16"], ["icecache"])


def test_split_markdown_row():
    md = split_markdown(_rows(), ["icecache"])
    assert ("| m | 4096 | 64 | icecache | oracle-p16 | 8 | 100.0 | 75.0 | 50.0 | 25.0 | +25.0 [" in md)
    assert "| m | 4096 | 128 | icecache | oracle-p16 | 8 | 100.0 | 100.0 | 100.0 | 100.0 | +0.0 [+0.0, +0.0] |" in md
    with pytest.raises(ValueError, match="'quest' has no scored rows at a limited budget"):
        split_markdown(_rows(), ["quest"])


def test_report_cli_split(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    md = tmp_path / "r.md"
    assert main(["report", str(path), "--split", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "### Loss split: budget, pages, search" in out and "| m | 4096 | 64 | icecache | oracle-p16 | 8 |" in out
    assert "Loss split" in md.read_text()
    assert main(["report", str(path), "--split", "icecache,oracle-p16"]) == 0
    assert "| m | 4096 | 64 | oracle-p16 | oracle-p16 | 8 |" in capsys.readouterr().out
    assert main(["report", str(path), "--split", "quest"]) == 2
    assert "'quest' has no scored rows" in capsys.readouterr().err


def test_paired_interval_does_not_depend_on_the_hash_seed(tmp_path):
    """The bootstrap resamples positions: the pairs must come in one order whatever Python's string hash seed."""
    import os
    import subprocess
    import sys

    path = tmp_path / "r.jsonl"
    rows = [_r(t, p, 64, i, float((i * 7 + len(t) + len(p)) % 3 > 0)) for t in ("task_a", "task_b", "task_c")
            for p in ("icecache", "oracle-p16") for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import json, sys; from kvpolicy.eval.stats import paired_comparison; "
            "rows = [json.loads(x) for x in open(sys.argv[1])]; "
            "p = paired_comparison(rows, 'icecache', 'oracle-p16')[('m', 4096, 64)]; print(p.diff)")
    outs = {subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3, 4)}
    assert len(outs) == 1, outs
