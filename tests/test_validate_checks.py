"""Issue 20, item 6: a NaN/inf query at decode is an error naming layer and head in ``validate=True`` mode;
integer K/V (token ids passed by mistake) get a clear message."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.hf import KVPolicyCache
from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy


def _layer(validate: bool) -> PolicyLayer:
    torch.manual_seed(0)
    layer = PolicyLayer(Policy.resolve("quest", budget=32), 3, validate=validate)
    kv = torch.randn(1, 2, 100, 16)
    layer.prefill(kv, kv.clone())
    return layer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_validate_mode_refuses_a_non_finite_query_naming_layer_and_head(bad):
    q = torch.randn(1, 4, 16)
    q[0, 2, 5] = bad
    k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"layer 3: the decode query of head 2 \(batch row 0\) holds NaN or inf "
                                         r"\(1 of 4 heads\)"):
        _layer(validate=True).decode(q, k, v, scaling=0.25)
    _layer(validate=False).decode(q, k, v, scaling=0.25)  # the hot path reads nothing back


def test_validate_mode_through_the_cache_and_a_model(tiny_llama):
    from kvpolicy.generation import generate

    ids = torch.arange(90).unsqueeze(0) % 128
    q_proj = tiny_llama.model.layers[-1].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda mod, inp, out: out.masked_fill(out.new_ones(()).bool(), float("nan"))
                                        if inp[0].shape[1] == 1 else out)
    try:
        with pytest.raises(ValueError, match=r"layer 2: the decode query of head 0 \(batch row 0\) holds NaN or inf"):
            generate(tiny_llama, ids, policy="quest", budget=32, max_new_tokens=3, validate=True,
                     prefill_chunk=None)
    finally:
        hook.remove()


def test_integer_kv_get_a_clear_message():
    ids = torch.randint(0, 100, (1, 2, 100, 16))
    with pytest.raises(TypeError, match=r"layer 0: keys must be a floating tensor, got torch.int64 \(integer K/V: "
                                        r"pass the attention's key/value states, not token ids\)"):
        PolicyLayer(Policy.resolve("quest", budget=32), 0).prefill(ids, ids)
    layer = _layer(validate=False)
    k = torch.randint(0, 5, (1, 2, 1, 16))
    with pytest.raises(TypeError, match=r"layer 3: key/value must be torch.float32 like the prefilled K/V, got "
                                        r"torch.int64/torch.int64 \(integer K/V"):
        layer.decode(torch.randn(1, 4, 16), k, k, scaling=0.25)
    with pytest.raises(TypeError, match="layer 3: the query must be a floating tensor, got torch.int64"):
        layer.decode(torch.zeros(1, 4, 16, dtype=torch.int64), k.float(), k.float(), scaling=0.25)


def test_integer_kv_through_the_cache(tiny_llama):
    cache = KVPolicyCache(tiny_llama, Policy.resolve("quest", budget=32))
    ids = torch.randint(0, 100, (1, 2, 100, 16))
    with pytest.raises(TypeError, match="must be a floating tensor, got torch.int64 \\(integer K/V"):
        cache.update(ids, ids, len(tiny_llama.model.layers) - 1)
