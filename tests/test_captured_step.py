"""The paths of the decode step (``kvpolicy.step.decode_step``) agree on the CPU: the fixed-shape step that
``PolicyLayer.cuda_graphs`` captures, run eagerly, and a step on pages that ``PolicyLayer.prefetch`` selected and
loaded ahead, each against the eager step.

A CUDA graph can only be recorded on a GPU (``tests/test_cuda.py`` does that). What can be checked anywhere is
the formulation it records: ``kvpolicy.step.decode_step`` with the window's valid length as a tensor attends over
the whole window buffer, and updates the counters in place. Run in place of the replay (through the layer's
``GraphCache``, on its static inputs), it must give the eager step's outputs, selections and counters, across
window flushes and insertions.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy.layer
from kvpolicy.concurrency import GraphCache
from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy

B, H, G, D, T = 1, 2, 4, 32, 700


class FixedShapeGraphs(GraphCache):
    """Runs the step on static inputs at every call, as a replay would, without a graph (none on the CPU)."""

    replays = 0

    def replay(self, key, fn, *inputs, device=None, on_capture=None):
        self.replays += 1
        return fn(*(x.clone() if isinstance(x, torch.Tensor) else torch.tensor(x) for x in inputs))


def _fixed_shape_key(layer, ctx, query, scaling, softcap):
    """The captured path wherever the real one could be taken (sink full, index built)."""
    return ("fixed-shape",) if layer.index.num_tokens and layer.kv.sink_full else None


def _inputs(seed: int):
    """A prompt's K/V and queries, and 60 decode steps' (query, key, value), at a limited budget's scale."""
    g = torch.Generator().manual_seed(seed)
    keys, vals = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    steps = [(torch.randn(B, H * G, D, generator=g), torch.randn(B, H, 1, D, generator=g),
              torch.randn(B, H, 1, D, generator=g)) for _ in range(60)]
    return keys, vals, torch.randn(B, H * G, T, D, generator=g), steps


@pytest.mark.parametrize("preset", ["icecache", "icecache-index", "quest", "exact-topk", "streaming"])
def test_fixed_shape_step_matches_the_eager_step(preset, monkeypatch):
    pol = Policy.preset(preset, budget=128)
    keys, vals, queries, steps = _inputs(5)
    runs = []
    for fixed in (False, True):
        if fixed:
            monkeypatch.setattr(kvpolicy.layer, "capture_key", _fixed_shape_key)
        layer = PolicyLayer(pol, 3)
        layer.graphs = FixedShapeGraphs()
        layer.cuda_graphs = True  # on the CPU the real capture_key says no: every step eager
        layer.prefill(keys, vals, queries=queries)
        outs = [layer.decode(q, k, v, scaling=D ** -0.5) for q, k, v in steps]
        runs.append((outs, layer.stats.as_dict(), layer.graphs.replays))
    (eager, st_e, n_e), (fixed, st_f, n_f) = runs
    assert n_e == 0 and n_f == len(steps)
    for a, b in zip(eager, fixed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for f in ("pages_selected", "pages_moved", "bytes_moved", "pages_inserted", "steps"):
        assert st_e[f] == st_f[f], f


@pytest.mark.parametrize("preset", ["icecache", "quest", "exact-topk", "oracle"])
def test_a_step_on_prefetched_pages_matches_the_eager_step(preset):
    """``PolicyLayer.prefetch`` with the step's own query, then ``decode``: the step attends the pages selected and
    loaded ahead, and gives the eager step's outputs, selections and counters bit for bit, at a limited budget
    across window flushes and insertions."""
    pol = Policy.preset(preset, budget=128)
    keys, vals, queries, steps = _inputs(11)
    runs = []
    for ahead in (False, True):
        layer = PolicyLayer(pol, 3, validate=True)
        layer.prefill(keys, vals, queries=queries)
        outs, sels = [], []
        for q, k, v in steps:
            if ahead:
                assert layer.prefetch(q, scaling=D ** -0.5)
            outs.append(layer.decode(q, k, v, scaling=D ** -0.5))
            sels.append(layer.last_selection.page_ids)
        runs.append((outs, sels, layer.stats.as_dict()))
    (eager, sel_e, st_e), (pre, sel_p, st_p) = runs
    assert st_e["prefetched_steps"] == 0 and st_p["prefetched_steps"] == len(steps)
    assert st_p["pages_inserted"] == st_e["pages_inserted"] > 0  # the window flushed meanwhile
    for a, b in zip(sel_e, sel_p):
        assert torch.equal(a, b)
    for a, b in zip(eager, pre):
        assert torch.equal(a, b)
    for f in ("pages_selected", "pages_moved", "bytes_moved", "steps"):
        assert st_e[f] == st_p[f], f
