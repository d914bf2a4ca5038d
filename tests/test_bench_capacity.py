"""``kvpolicy bench capacity`` on the CPU (tiny random Llama): rows, the doubling, failures as rows."""

from __future__ import annotations

import json

import pytest

from kvpolicy.bench.capacity import CapacityBenchConfig, bench_capacity
from kvpolicy.bench.decode import load_bench_model
from kvpolicy.cli import main

FIELDS = {"variant", "length", "ttft_s", "tpot_ms", "tpot_mean_ms", "error", "max_context", "host_pinned_bytes",
          "device_kv_bytes", "index_device_bytes"}


@pytest.fixture(scope="module")
def tiny():
    return load_bench_model(None, "tiny-llama", "cpu", "float32")[0]


@pytest.mark.parametrize("fill", ["prefill", "synthetic"])
def test_doubles_until_the_model_context_and_records_the_failure(tiny, fill):
    cfg = CapacityBenchConfig(policies=["quest", "icecache"], budget=128, start=2048, max_length=16384, steps=2,
                              prefill_chunk=1024, fill=fill)
    rows = bench_capacity(tiny, cfg, progress=False)
    # the tiny config has 8192 positions: 8192 + the decode steps do not fit, so the doubling tries the longest
    # prompt that does (7168, a multiple of 1024), then stops at 16384
    assert [(r["variant"], r["length"]) for r in rows] == [
        (v, n) for v in ("dense", "quest", "icecache") for n in (2048, 4096, 7168, 16384)]
    for r in rows:
        if r["length"] < 8192:
            assert not r["error"] and FIELDS <= set(r) and r["tpot_ms"] > 0 and r["max_context"] == 7168
        else:
            assert "exceeds the model's context of 8192" in r["error"]
    quest = [r for r in rows if r["variant"] == "quest" and not r["error"]]
    assert quest[1]["host_pool_bytes"] > quest[0]["host_pool_bytes"] > 0  # the pages live in the CPU pool


def test_a_failing_run_is_a_row_and_stops_that_variant_only(tiny, monkeypatch):
    from kvpolicy.bench import capacity

    real = capacity.synthetic_fill

    def fill(model, cache, length, **kw):
        if hasattr(cache, "policy_layers") and length >= 4096:
            raise MemoryError
        return real(model, cache, length, **kw)

    monkeypatch.setattr(capacity, "synthetic_fill", fill)
    cfg = CapacityBenchConfig(policies=["quest"], budget=128, start=2048, max_length=4096, steps=2, fill="synthetic")
    rows = bench_capacity(tiny, cfg, progress=False)
    by = {(r["variant"], r["length"]): r for r in rows}
    assert not by["dense", 4096]["error"] and by["dense", 4096]["max_context"] == 4096
    assert by["quest", 4096]["error"] == "host out of memory (MemoryError)" and by["quest", 2048]["max_context"] == 2048


def test_a_length_the_host_cannot_hold_is_not_run(tiny, monkeypatch):
    """Host memory is projected from the variant's last run: a length whose pools and index would not fit in the
    available memory is an error row, never run (a host out of memory kills the whole process)."""
    from kvpolicy.bench import capacity

    first = {}

    def fake_available():  # less than what the 2048-token run held: 4096 tokens (twice that) do not fit
        return int(0.8 * first["held"])

    real = capacity._run

    def run(model, vname, pol, length, cfg):
        row = real(model, vname, pol, length, cfg)
        if pol is not None:
            first.setdefault("held", row["host_pool_bytes"] + row["host_index_bytes"])
        return row

    monkeypatch.setattr(capacity, "_run", run)
    monkeypatch.setattr(capacity, "_available_host_bytes", fake_available)
    cfg = CapacityBenchConfig(policies=["quest"], budget=128, start=2048, max_length=4096, steps=2, fill="synthetic",
                              dense=False)
    rows = bench_capacity(tiny, cfg, progress=False)
    assert [r["length"] for r in rows] == [2048, 4096] and first["held"] > 0
    assert not rows[0]["error"] and "host out of memory (projected)" in rows[1]["error"]
    assert rows[1]["max_context"] == 2048


def test_cli_writes_json_and_refuses_bad_settings(tmp_path, capsys):
    out = tmp_path / "cap.json"
    assert main(["bench", "capacity", "--config", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--policy",
                 "quest", "--budget", "128", "--start", "2k", "--max-length", "2k", "--steps", "2", "--fill",
                 "synthetic", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["variant"] for r in data["rows"]} == {"dense", "quest"} and data["meta"]["weights_bytes"] > 0
    assert main(["bench", "capacity", "--config", "tiny-llama", "--device", "cpu", "--start", "8k",
                 "--max-length", "4k"]) == 2
    assert "start (8192) is above max_length (4096)" in capsys.readouterr().err
