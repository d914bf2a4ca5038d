"""The fixed-shape decode step that ``PolicyLayer.cuda_graphs`` captures, run eagerly on the CPU.

A CUDA graph can only be recorded on a GPU (``tests/test_cuda.py`` does that). What can be checked anywhere is
the formulation it records: ``PolicyLayer._device_step`` attends over the whole window buffer with the valid
length as a tensor and updates the counters in place. Run in place of the replay, it must give the eager
step's outputs, selections and counters, across window flushes and insertions.
"""

from __future__ import annotations

import pytest
import torch

from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy


class FixedShapeLayer(PolicyLayer):
    """Takes the captured path wherever the real one could (sink full, index built), without a graph."""

    def _capture_key(self, ctx, query, scaling, softcap):
        ready = self.index.num_tokens and self.sink_k.shape[2] >= self.budget.sink_tokens
        return ("fixed-shape",) if ready else None

    def _replay(self, key, query, ctx, scaling, softcap):
        self._win_len_t = torch.tensor([self.win_len])
        self.replays += 1
        return self._device_step(query, ctx, scaling, softcap)


@pytest.mark.parametrize("preset", ["icecache", "icecache-index", "quest", "exact-topk", "streaming"])
def test_fixed_shape_step_matches_the_eager_step(preset):
    pol = Policy.preset(preset, budget=128)
    g = torch.Generator().manual_seed(5)
    B, H, G, D, T = 1, 2, 4, 32, 700
    keys, vals = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    steps = [(torch.randn(B, H * G, D, generator=g), torch.randn(B, H, 1, D, generator=g),
              torch.randn(B, H, 1, D, generator=g)) for _ in range(60)]
    runs = []
    for cls in (PolicyLayer, FixedShapeLayer):
        layer = cls(pol, 3)
        layer.replays = 0
        layer.cuda_graphs = True  # ignored by PolicyLayer on the CPU; FixedShapeLayer takes the fixed-shape path
        layer.prefill(keys, vals, queries=torch.randn(B, H * G, T, D, generator=g))
        outs = [layer.decode(q, k, v, scaling=D ** -0.5) for q, k, v in steps]
        runs.append((outs, layer.stats.as_dict(), layer.replays))
    (eager, st_e, n_e), (fixed, st_f, n_f) = runs
    assert n_e == 0 and n_f == len(steps)
    for a, b in zip(eager, fixed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for f in ("pages_selected", "pages_moved", "bytes_moved", "pages_inserted", "steps"):
        assert st_e[f] == st_f[f], f
