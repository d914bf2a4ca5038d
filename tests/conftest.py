"""Shared fixtures: tiny random-weight models (shape tests only) and the CUDA marker."""

from __future__ import annotations

import pytest
import torch


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
