"""Policy construction, budget accounting and bad input (clear errors, raised before any state exists)."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.errors import UnknownNameError
from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy


def test_budget_accounting_matches_icecache_paper():
    b = Policy.preset("oracle", budget=256).resolve_budget()
    # IceCache paper: 256 tokens = 16 pages x 16 = 2 sink + 2 window + 12 retrieved
    assert (b.tokens, b.pages, b.sink_pages, b.window_pages, b.retrieved_pages) == (256, 16, 2, 2, 12)
    assert Policy.preset("full", budget=256).resolve_budget().unlimited  # full ignores the budget
    assert Policy.preset("oracle").resolve_budget().unlimited
    b64 = Policy.preset("oracle", budget=64).resolve_budget()
    assert (b64.sink_pages, b64.window_pages, b64.retrieved_pages) == (1, 1, 2)
    b64 = Policy.preset("oracle", budget=64, sink_pages=2).resolve_budget()
    assert (b64.sink_pages, b64.window_pages, b64.retrieved_pages) == (2, 1, 1)


def test_from_config_dict_and_yaml(tmp_path):
    cfg = {"index": {"name": "exact"}, "selector": "index_topk", "budget": 128, "dense_layers": [1, 0]}
    p = Policy.from_config(cfg)
    assert p.dense_layers == (0, 1) and p.selector.name == "index_topk"
    assert Policy.from_config(p.to_config()) == p
    f = tmp_path / "pol.yaml"
    f.write_text("preset: streaming\nbudget: 64\nsink_pages: 1\nwindow_pages: 1\n")
    q = Policy.resolve(str(f))
    assert (q.selector.name, q.budget, q.name) == ("streaming", 64, "streaming")
    assert q.resolve_budget().retrieved_pages == 2


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"budget": 100}, ValueError, "does not divide the budget"),
        ({"budget": 16}, ValueError, "smaller than sink"),
        ({"budget": 48, "sink_pages": 2, "window_pages": 2}, ValueError, "smaller than sink"),
        ({"page_size": 0}, ValueError, "page_size"),
        ({"window_pages": 0}, ValueError, "window_pages"),
        ({"budget": 12.5}, TypeError, "budget"),
        ({"dense_layers": [-1]}, ValueError, "dense_layers"),
    ],
)
def test_bad_policy_values(kwargs, err, match):
    with pytest.raises(err, match=match):
        Policy(selector="oracle", **kwargs)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownNameError, match="Did you mean 'streaming'"):
        Policy.resolve("streamin")
    with pytest.raises(UnknownNameError, match="Did you mean 'oracle'"):
        Policy(selector="orcale")
    with pytest.raises(UnknownNameError, match="index"):
        Policy(selector="oracle", index="exakt")
    with pytest.raises(ValueError, match="unknown policy key 'budgte'"):
        Policy.from_config({"preset": "oracle", "budgte": 64})
    with pytest.raises(ValueError, match="bad hyperparameters for index 'exact'"):
        Policy(selector="oracle", index={"name": "exact", "nlist": 4})


def test_layer_rejects_bad_prefill_before_changing_state():
    layer = PolicyLayer(Policy.preset("oracle", budget=128), 0)
    with pytest.raises(ValueError, match="dims"):
        layer.prefill(torch.randn(2, 100, 16), torch.randn(2, 100, 16))
    with pytest.raises(TypeError, match="floating"):
        layer.prefill(torch.ones(1, 2, 200, 16, dtype=torch.long), torch.ones(1, 2, 200, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        layer.prefill(torch.randn(1, 2, 200, 16), torch.randn(1, 2, 199, 16))
    assert not layer.prefilled
    layer.prefill(torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16))
    with pytest.raises(ValueError, match="query must be"):
        layer.decode(torch.randn(1, 3, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), scaling=0.25)
    assert layer.seq_len == 200 and layer.stats.steps == 0


def test_prepare_and_insertions_see_the_policy_budget_while_steps_see_the_covered_one():
    """A budget above the context covers the decode steps (every page), but the build's ``Selector.prepare`` and
    the insertions see the policy's own budget (a selector sizes its state from it: H2O's kept set)."""
    layer = PolicyLayer(Policy.preset("oracle", budget=128), 0)
    seen = []
    real = layer.selector.prepare
    layer.selector.prepare = lambda keys, layout, ctx: (seen.append(ctx.budget), real(keys, layout, ctx))[1]
    layer.prefill(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))
    assert seen == [layer.budget] and seen[0].retrieved_pages is not None
    assert layer.step_context(1.0, None, 101).budget.retrieved_pages is None  # 101 <= 128: covered
    assert layer.step_context(1.0, None, 129).budget == layer.budget


def test_batch_size_above_a_part_limit():
    from kvpolicy.reference.oracle_selector import OracleSelector

    class OneRow(OracleSelector):
        name = "oracle-one-row"
        max_batch_size = 1

    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.registry import Registry

    class P:
        @hookimpl
        def kvpolicy_register_selectors(self):
            return [OneRow]

    reg = Registry()
    reg.register(P(), name="one-row")
    layer = PolicyLayer(Policy(selector="oracle-one-row", budget=128, registry=reg), 0)
    with pytest.raises(ValueError, match="batch size 2 is above"):
        layer.prefill(torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16))


def test_short_prompt_fills_sink_first():
    layer = PolicyLayer(Policy.preset("oracle"), 0)
    layer.prefill(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    for _ in range(30):
        layer.decode(torch.randn(1, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), scaling=0.3)
    assert layer.kv.sink_k.shape[2] == 32 and layer.seq_len == 40 and layer.kv.win_len == 8


def test_layer_memory_says_where_the_index_lives():
    from kvpolicy.layer import PolicyLayer

    layer = PolicyLayer(Policy.preset("icecache", budget=128), 3)
    assert layer.memory() == {"device_kv": 0, "cpu_kv": 0, "index": 0, "index_on_device": 0, "selector": 0,
                              "selector_on_device": 0}
    keys = torch.randn(1, 2, 600, 32)
    layer.prefill(keys, torch.randn_like(keys))
    mem = layer.memory()
    assert mem["index"] > 0 and mem["index_on_device"] == 0  # CPU compute device: nothing counts as "on device"
    assert mem["cpu_kv"] > mem["device_kv"] > 0


def test_layer_memory_counts_the_selectors_state():
    """Quest's page digests (bounds, centroid, radius of every page) are counted as selector bytes, once per
    storage; a stateless selector counts nothing."""
    from kvpolicy.layer import PolicyLayer

    keys = torch.randn(1, 2, 600, 32)
    mems = {}
    for preset in ("quest", "streaming"):
        layer = PolicyLayer(Policy.preset(preset, budget=128), 3)
        layer.prefill(keys, torch.randn_like(keys))
        mems[preset] = (layer.memory(), layer.selector)
    mem, sel = mems["quest"]
    d = sel.digests
    assert mem["selector"] == sum(t.nbytes for t in (d.lo, d.hi, d.centre, d.radius, d.num_pages)) > 600 * 2 * 32 * 4 / 16
    assert mem["selector_on_device"] == 0  # CPU compute device
    assert mems["streaming"][0]["selector"] == 0
