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
    assert "| x | 64 | 100.0 | 0.0 | 50.0 | n/a | 50% |" in md  # (1 + 0) / 2 against full's (1 + 1) / 2; one sample: no CI


def test_report_cli_common_tasks_names_what_it_left_out(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["report", str(path), "--common-tasks"]) == 0
    err = capsys.readouterr().err
    assert "m at 4096 tokens: left out c" in err


# ------------------------------------------------------------------ statistics (kvpolicy.eval.stats)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvpolicy.eval.report import comparison_markdown  # noqa: E402
from kvpolicy.eval.stats import bootstrap_mean, paired_comparison  # noqa: E402


def _srow(task, policy, budget, sample, score, length=4096):
    return {**_row(task, policy, budget, score, length), "sample": sample, "seed": 0}


def test_bootstrap_of_a_constant_column_has_zero_width():
    iv = bootstrap_mean([0.7] * 9)
    assert iv.mean == pytest.approx(0.7) and iv.lo == pytest.approx(0.7) and iv.hi == pytest.approx(0.7)
    assert iv.n == 9


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    vals = [0.0, 1.0] * 10
    a, b = bootstrap_mean(vals), bootstrap_mean(vals)
    assert a == b  # fixed seed
    assert a.lo < 0.5 < a.hi and a.mean == 0.5
    # binomial p=0.5, n=20: standard error 0.112, so the 95% interval is about +-0.22
    assert 0.15 < a.hi - 0.5 < 0.3 and 0.15 < 0.5 - a.lo < 0.3
    assert bootstrap_mean(vals, seed=1) != a  # the seed is what makes it reproducible
    wide = bootstrap_mean([0.0, 1.0] * 3)
    assert wide.hi - wide.lo > a.hi - a.lo  # fewer samples, wider interval


def test_bootstrap_averages_tasks_not_samples():
    iv = bootstrap_mean({"a": [1.0] * 8, "b": [0.0, 0.0]})  # stratified: task means 1 and 0
    assert iv.mean == 0.5 and iv.lo == pytest.approx(0.5) and iv.hi == pytest.approx(0.5) and iv.n == 2
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])


STAT_ROWS = [
    *[_srow(t, "full", None, i, 1.0) for t in "ab" for i in range(5)],
    *[_srow(t, "x", 64, i, float(i % 2)) for t in "ab" for i in range(5)],  # 0,1,0,1,0
    *[_srow(t, "y", 64, i, 0.0) for t in "ab" for i in range(5)],
    *[_srow(t, "x", 128, i, 1.0) for t in "ab" for i in range(5)],
    *[_srow(t, "y", 128, i, 1.0) for t in "ab" for i in range(5)],
]


def test_paired_comparison_with_itself_is_all_ties():
    res = paired_comparison(STAT_ROWS, "x", "x")
    assert set(res) == {("m", 4096, 64), ("m", 4096, 128)}
    for p in res.values():
        assert (p.wins, p.ties, p.losses) == (0, 10, 0)
        assert p.diff.mean == p.diff.lo == p.diff.hi == 0


def test_paired_comparison_counts_and_interval():
    res = paired_comparison(STAT_ROWS, "x", "y")
    p64, p128 = res[("m", 4096, 64)], res[("m", 4096, 128)]
    assert (p64.wins, p64.ties, p64.losses) == (4, 6, 0)  # x scores 1 on samples 1 and 3 of both tasks
    assert p64.diff.mean == pytest.approx(0.4) and 0 <= p64.diff.lo < 0.4 < p64.diff.hi
    assert (p128.wins, p128.ties, p128.losses) == (0, 10, 0)
    # full has only unlimited rows: paired with every budget of the other policy
    vs_full = paired_comparison(STAT_ROWS, "x", "full")
    assert vs_full[("m", 4096, 64)].losses == 6 and vs_full[("m", 4096, 128)].ties == 10
    with pytest.raises(ValueError, match="'z' has no scored rows; policies in the rows: full, x, y"):
        paired_comparison(STAT_ROWS, "x", "z")


def test_paired_comparison_needs_shared_samples():
    rows = [_srow("a", "x", 64, 0, 1.0), _srow("a", "y", 64, 1, 1.0)]
    with pytest.raises(ValueError, match="share no"):
        paired_comparison(rows, "x", "y")


def test_markdown_has_the_interval_and_the_comparison():
    md = markdown_report(STAT_ROWS)
    assert "| average | 95% CI | vs full | n |" in md
    assert "| full | all | 100.0 | 100.0 | 100.0 | [100.0, 100.0] | 100% | 5 |" in md
    line = next(x for x in md.splitlines() if x.startswith("| x | 64 |"))
    lo, hi = (float(v) for v in line.split("|")[6].strip(" []").split(","))
    assert lo < 40.0 < hi
    cmp = comparison_markdown(STAT_ROWS, "x", "y")
    assert "| m | 4096 | 64 | 10 | 4 | 6 | 0 | +40.0 |" in cmp
    assert "| m | 4096 | 128 | 10 | 0 | 10 | 0 | +0.0 | [+0.0, +0.0] |" in cmp


def test_one_sample_has_no_interval():
    md = markdown_report([_srow("a", "full", None, 0, 1.0)])
    assert "| full | all | 100.0 | 100.0 | n/a | 100% | 1 |" in md


def test_report_cli_compare(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in STAT_ROWS))
    md = tmp_path / "r.md"
    assert main(["report", str(path), "--compare", "x,y", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "Paired comparison: x vs y" in out and "| m | 4096 | 64 | 10 | 4 | 6 | 0 |" in out
    assert "Paired comparison: x vs y" in md.read_text()
    assert main(["report", str(path), "--compare", "x,quest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'quest' has no scored rows" in err[0] and "full, x, y" in err[0]
    assert main(["report", str(path), "--compare", "x"]) == 2
    assert "two comma-separated policies" in capsys.readouterr().err


def test_plots_have_error_bars(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    from kvpolicy.eval.report import plot_report

    calls = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        calls.append((kw.get("label"), list(x), list(y), np.asarray(yerr)))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    paths = plot_report(STAT_ROWS, tmp_path)
    assert [p.name for p in paths] == ["m_accuracy_vs_budget.png"]
    x = next(c for c in calls if c[0] == "x")
    assert x[1] == pytest.approx([64, 128], rel=0.1) and x[2] == pytest.approx([40.0, 100.0])
    assert x[3].shape == (2, 2) and (x[3][:, 0] > 0).all() and (x[3][:, 1] == 0).all()  # 128: constant, no bar
