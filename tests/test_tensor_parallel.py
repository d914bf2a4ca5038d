"""Tensor parallelism (issue 21): the checks before any work, and 2 processes under torchrun (gloo, CPU) with
transformers' tensor-parallel plan decoding the same tokens as one process.

The multi-process tests (marked ``tp``) launch ``torchrun --standalone --nproc-per-node 2`` on a tiny Qwen2
checkpoint (4 query / 2 KV heads: one KV head per rank), each launch under a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpolicy import distributed
from kvpolicy.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "tp_worker.py"
TIMEOUT_S = 180


# ------------------------------------------------------------------------------------------ in one process


def _config(hq: int, hkv: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=64, hidden_size=8 * hq, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=hq, num_key_value_heads=hkv, head_dim=8)


def test_check_heads():
    distributed.check_heads(_config(4, 2), 2)
    distributed.check_heads(_config(4, 1), 1)
    with pytest.raises(ValueError, match=r"1 KV heads, which do not split over 2 ranks.*use --tp 1"):
        distributed.check_heads(_config(4, 1), 2)
    with pytest.raises(ValueError, match=r"3 KV heads, which do not split over 2 ranks.*\(3 KV / 6 query .*"
                                         r"use --tp 1 or 3"):
        distributed.check_heads(_config(6, 3), 2)


def test_shardable_flag():
    """Every part is shardable by default; OmniKV's shared selection over all heads is not."""
    for name in ("full", "oracle", "quest", "icecache", "streaming"):
        distributed.check_shardable(Policy.resolve(name, budget=128))
    with pytest.raises(ValueError, match=r"selector 'omnikv' \(OmniKVSelector\) is not shardable"):
        distributed.check_shardable(Policy.resolve("omnikv", budget=128))
    distributed.check_shardable(Policy.resolve({"preset": "omnikv", "selector": {"name": "omnikv",
                                                                                   "shared_heads": False}}))


def test_one_process_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    w = distributed.init_tensor_parallel(None)
    assert (w.rank, w.size, w.is_main, w.tag()) == (0, 1, True, "")
    assert distributed.init_tensor_parallel(1).size == 1
    with pytest.raises(distributed.RankError, match=r"--tp 2 needs 2 processes.*torchrun --nproc-per-node 2"):
        distributed.init_tensor_parallel(2)
    model = torch.nn.Linear(2, 2)
    assert distributed.tp_size(model) == 1
    assert distributed.sum_over_ranks({"a": 1}, model) == ({"a": 1}, [{"a": 1}])


def test_cli_tp_without_torchrun(capsys, monkeypatch):
    from kvpolicy.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--tp", "2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "kvpolicy generate: error: --tp 2 needs 2 processes" in err and "rank" not in err
    assert main(["eval", "--tp", "0", "--out", "x.jsonl"]) == 2
    assert "--tp must be at least 1" in capsys.readouterr().err


def test_bench_decode_tp_needs_a_checkpoint():
    from kvpolicy.bench.decode import load_bench_model

    with pytest.raises(ValueError, match="--tp shards a checkpoint as it loads: give --model"):
        load_bench_model(None, "tiny-llama", "cpu", tp=2)


# ------------------------------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny Qwen2 (4 query / 2 KV heads, 3 layers) with a byte-level tokenizer (one token per byte, no
    merges), saved as a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2-tp")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(path)
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)


@pytest.mark.tp
def test_two_ranks_decode_like_one(tiny_checkpoint, tmp_path):
    """kvpolicy.generate on 2 ranks (one KV head each) gives the tokens of one process for every run, at an
    unlimited budget and at 128 tokens; each rank holds half of the KV; the checks fail alike on both ranks."""
    from tests import tp_worker

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    proc = _torchrun(str(WORKER), str(tiny_checkpoint), str(two))
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp_worker.main([str(tiny_checkpoint), str(one)])
    ref, got = json.loads(one.read_text()), json.loads(two.read_text())
    assert got["world"] == 2
    for a, b in zip(ref["runs"], got["runs"], strict=True):
        label = f"{a['policy']} @ {a['budget']}"
        assert b["tokens"] == a["tokens"], label
        assert len(b["memory_per_rank"]) == 2, label
        for key in ("device_kv", "cpu_kv"):  # the two ranks hold the two heads: the same bytes in all
            assert b["memory"][key] == a["memory"][key], (label, key)
            assert b["memory_per_rank"][0][key] == b["memory_per_rank"][1][key] == a["memory"][key] // 2
    errors = got["errors"]
    assert "on every rank: policy 'omnikv' cannot run tensor-parallel" in errors["unshardable"]
    assert "the ranks run different policies" in errors["budgets"]
    assert "budget: rank 0 128, rank 1 256" in errors["budgets"]


@pytest.mark.tp
def test_cli_two_ranks(tiny_checkpoint, capsys):
    """`torchrun -m kvpolicy generate --tp 2` prints the text of one process once (rank 0 only), with memory summed
    over the ranks; an error that every rank meets is printed once, and all ranks stop."""
    from kvpolicy.cli import main

    prompt = "".join(chr(97 + (7 * i) % 26) for i in range(400))
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", prompt, "--no-chat", "--max-new-tokens", "6",
              "--policy", "oracle", "--budget", "128"]
    assert main(common) == 0
    expected = capsys.readouterr().out
    proc = _torchrun("-m", "kvpolicy", *common, "--tp", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == expected
    assert proc.stderr.count("new tokens in") == 1 and "summed over 2 tensor-parallel ranks" in proc.stderr

    bad = [a if a != "oracle" else "omnikv" for a in common]
    proc = _torchrun("-m", "kvpolicy", *bad, "--tp", "2")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("kvpolicy generate: error: on every rank: policy 'omnikv' cannot run tensor-parallel") == 1
