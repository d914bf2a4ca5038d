"""The cache goes to transformers under the keyword it takes, and a deprecated keyword fails the suite."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_keyword, cache_kwargs


def test_the_keyword_is_one_the_model_forward_takes(tiny_llama):
    params = inspect.signature(type(tiny_llama).forward).parameters
    assert cache_keyword() in params
    assert cache_keyword() == ("cache" if "cache" in params else "past_key_values")
    assert cache_kwargs("c") == {cache_keyword(): "c"}


def test_generate_warns_nothing(tiny_llama):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = kvpolicy.generate(tiny_llama, ids, policy="exact-topk", budget=64, max_new_tokens=3)
    assert res.new_tokens == 3
    future = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert not future, future


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_the_suite_turns_the_deprecated_keyword_into_an_error(tiny_llama, call):
    """pyproject's filterwarnings make transformers' `past_key_values` notice an error, also where it is
    attributed to torch's Module.__call__ (a forward) rather than to the caller."""
    if cache_keyword() != "cache":
        pytest.skip("this transformers takes only `past_key_values`: nothing is deprecated")
    from transformers import DynamicCache

    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    old = {"past_key_values": DynamicCache(config=tiny_llama.config)}
    with torch.inference_mode(), pytest.raises(FutureWarning, match="past_key_values"):
        if call == "forward":
            tiny_llama(ids, use_cache=True, **old)
        else:
            tiny_llama.generate(ids, max_new_tokens=2, do_sample=False, **old)
