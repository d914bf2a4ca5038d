"""The passkey demo's shared prefill: the prefix all prompts share is computed once."""

from __future__ import annotations

import copy

import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.eval.demo import shared_prefix_length


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps a token of its own
    assert shared_prefix_length([[1, 2, 3]]) == 2
    assert shared_prefix_length([[9, 2], [1, 2]]) == 0


def test_prefix_then_suffix_gives_the_logits_of_one_prefill(tiny_llama):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 128, (1, 80), generator=g)
    prompts = [torch.cat([prefix, torch.randint(0, 128, (1, n), generator=g)], 1) for n in (30, 45)]
    shared = shared_prefix_length([p[0].tolist() for p in prompts])
    assert shared >= 80
    with torch.inference_mode():
        base = DynamicCache(config=tiny_llama.config)
        tiny_llama(prompts[0][:, :shared], **cache_kwargs(base), use_cache=True)
        for ids in prompts:
            whole = tiny_llama(ids, **cache_kwargs(DynamicCache(config=tiny_llama.config)), use_cache=True)
            rest = tiny_llama(ids[:, shared:], **cache_kwargs(copy.deepcopy(base)), use_cache=True)
            torch.testing.assert_close(rest.logits[:, -1], whole.logits[:, -1], rtol=1e-4, atol=1e-4)
