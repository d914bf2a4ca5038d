"""``kvpolicy bench decode`` on a tiny random Llama (CPU): rows, breakdown, memory accounting, plot, errors."""

from __future__ import annotations

import json

import pytest

from kvpolicy.bench.decode import DecodeBenchConfig, bench_decode, load_bench_model, plot_decode
from kvpolicy.cli import main


@pytest.fixture(scope="module")
def tiny():
    return load_bench_model(None, "tiny-llama", "cpu")[0]


def test_bench_decode_rows(tiny):
    cfg = DecodeBenchConfig(policies=["quest", "streaming"], budget=64, lengths=[512], steps=3, breakdown_steps=2)
    rows = bench_decode(tiny, cfg, model_name="tiny", progress=False)
    assert [r["variant"] for r in rows] == ["dense", "quest", "streaming"]
    dense, quest, stream = rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tpot_ms"] > 0 and r["ttst_s"] > r["ttft_s"] > 0
        assert len(r["step_times_ms"]) == 3
    assert dense["tpot_vs_dense"] == pytest.approx(1.0)
    assert dense["device_kv_fraction"] == 1.0 and dense["cpu_kv_bytes"] == 0
    # dense KV: 4 layers x K,V x 1 head x (512 + 1 + 3 + 0 breakdown) tokens x 64 x 4 bytes (fp32 default weights)
    assert dense["device_kv_bytes"] == 4 * 2 * 1 * (512 + 1 + 3) * 64 * tiny.dtype.itemsize
    # most of the KV lives in CPU pages (quest keeps its first two of the four layers dense, on the device; the
    # CPU pools hold the pages, rounded up to whole chunks)
    assert 0 < stream["device_kv_fraction"] < 0.5 and 0 < quest["device_kv_fraction"] < 0.6
    for r in (quest, stream):
        assert r["cpu_kv_bytes"] > 0
        assert r["index_device_bytes"] == 0  # a CPU run: no index lives on a compute device
        for k in ("select_ms", "transfer_ms", "attention_ms", "insert_ms", "rest_ms", "breakdown_step_ms"):
            assert r[k] >= 0, k
        assert r["select_ms"] + r["transfer_ms"] + r["attention_ms"] <= r["breakdown_step_ms"]
    assert quest["pages_moved_per_step"] >= 0
    for r in (quest, stream):  # prefill jobs and insertions, summed over the policy layers
        assert r["layers_build_s"] >= r["layers_build_index_s"] + r["layers_pool_alloc_s"] + r["layers_build_pool_s"]
        assert r["layers_build_index_s"] >= 0 and r["layers_wait_s"] >= 0
    assert quest["pages_inserted"] >= 0 and "layers_build_s" not in dense


def test_variant_suffixes():
    from kvpolicy.bench.decode import split_variant

    assert split_variant("icecache@cuda:uva+graphs+defer") == ("icecache@cuda:uva", True, True, "off")
    assert split_variant("icecache+defer+graphs") == ("icecache", True, True, "off")
    assert split_variant("quest+defer") == ("quest", False, True, "off")
    assert split_variant("quest") == ("quest", False, False, "off")
    assert split_variant("icecache-reuse:uva+prefetch+graphs") == ("icecache-reuse:uva", True, False, "follow")
    assert split_variant("icecache+estimate").prefetch == "estimate"
    with pytest.raises(ValueError, match="choose one of"):
        split_variant("icecache+estimate+prefetch")


def test_bench_decode_deferred_insertion(tiny):
    # 40 steps past a 512-token prompt: every policy layer inserts pages, deferred behind the next steps
    cfg = DecodeBenchConfig(policies=["exact-topk+defer"], budget=64, lengths=[512], steps=40, breakdown_steps=0,
                            dense=False)
    (row,) = bench_decode(tiny, cfg, progress=False)
    assert "error" not in row, row.get("error")
    assert row["pages_inserted"] > 0 and "deferred_steps" in row


def test_bench_decode_cli_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "decode", "--config", "tiny-llama", "--dtype", "float32", "--device", "cpu", "--policy",
               "quest", "--budget", "64", "--length", "512", "--steps", "2", "--breakdown-steps", "1",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {r["variant"] for r in doc["rows"]} == {"dense", "quest"}
    assert doc["meta"]["config"]["budget"] == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TPOT" in capsys.readouterr().out


def test_bench_decode_errors(capsys):
    assert main(["bench", "decode", "--config", "tiny-llama", "--policy", "no-such-policy"]) == 2
    assert "no-such-policy" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown config"):
        load_bench_model(None, "nope", "cpu")


def test_bench_decode_too_long(tiny):
    cfg = DecodeBenchConfig(policies=[], budget=64, lengths=[8190], steps=3, breakdown_steps=0)
    (row,) = bench_decode(tiny, cfg, progress=False)
    assert "exceeds the model's context" in row["error"]


def test_plot_without_rows(tmp_path):
    assert plot_decode([], tmp_path / "empty.png").exists()


def test_static_dense_baseline_decodes_what_the_dynamic_cache_decodes(tiny):
    """The captured dense baseline's step (run eagerly here: no CUDA) with its static cache generates the same
    greedy tokens as eager decoding with a DynamicCache; on a CPU the variant is an error row, not a crash."""
    import torch
    from transformers import DynamicCache

    from kvpolicy.bench.decode import _run_dense_static, _run_variant

    cfg = DecodeBenchConfig(policies=[], lengths=[300], steps=6, breakdown_steps=0)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(3))
    eager = _run_variant(tiny, ids, DynamicCache(config=tiny.config), cfg)
    static = _run_dense_static(tiny, ids, cfg, capture=False)
    assert static["tokens"] == eager["tokens"] and len(static["tokens"]) == 1 + 1 + 6
    assert static["device_kv_bytes"] >= 4 * 2 * 1 * 300 * 64 * tiny.dtype.itemsize
    rows = bench_decode(tiny, DecodeBenchConfig(policies=["streaming"], budget=64, lengths=[256], steps=2,
                                                breakdown_steps=0, dense_graphs=True), progress=False)
    assert [r["variant"] for r in rows] == ["dense", "dense+graphs", "streaming"]
    assert "CUDA" in rows[1]["error"] and "error" not in rows[2]


def test_policy_warmup_runs_each_variant_untimed_first(tiny, monkeypatch):
    import kvpolicy.bench.decode as bd

    seen = []
    real = bd._run_variant

    def spy(model, ids, cache, cfg):
        seen.append((ids.shape[1], cfg.steps))
        return real(model, ids, cache, cfg)

    monkeypatch.setattr(bd, "_run_variant", spy)
    cfg = DecodeBenchConfig(policies=["quest"], budget=64, lengths=[512], steps=3, breakdown_steps=0, dense=False)
    bench_decode(tiny, cfg, progress=False)
    assert seen == [(512, 16 + 4), (512, 3)]  # the warm-up passes a window flush, then the timed run
    seen.clear()
    bench_decode(tiny, DecodeBenchConfig(policies=["quest"], budget=64, lengths=[512], steps=3, breakdown_steps=0,
                                         dense=False, policy_warmup=False), progress=False)
    assert seen == [(512, 3)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 127])
def test_static_decode_attention_reads_only_the_written_positions(n, device):
    """The captured dense baseline's attention: a one-token query over a static buffer of 130 positions (8 pages of
    16 and a tail of 2) attends to the first ``n`` positions exactly as SDPA over those alone; what lies beyond
    (garbage here) never counts. Outside ``static_decode`` the call is SDPA's."""
    import torch

    from kvpolicy.bench.static_attention import static_decode, static_decode_attention

    g = torch.Generator().manual_seed(n)
    B, Hq, H, L, D = 1, 8, 2, 130, 32
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    k[:, :, n:] = 1e4  # garbage beyond the written positions
    q, k, v = q.to(device), k.to(device), v.to(device)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :n].repeat_interleave(Hq // H, 1), v[:, :, :n].repeat_interleave(Hq // H, 1), scale=0.2)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, Hq // H
    with static_decode(torch.tensor([n], device=device)):
        out, _ = static_decode_attention(module, q, k, v, None, scaling=0.2)  # CUDA: the Triton split-K kernel
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="int64"):
        with static_decode(torch.tensor([n], dtype=torch.int32)):
            pass
