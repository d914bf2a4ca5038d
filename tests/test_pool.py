"""``PagePool.write``: pages are written whole, so a pool's K/V need no zero fill (garbage never shows)."""

from __future__ import annotations

import torch

from kvpolicy.pool import PagePool
from kvpolicy.types import PAD, PageLayout


def _layout(token_ids: list[list[int]], num_pages: int, n_tokens: int) -> PageLayout:
    # one batch row, one KV head; token_ids per page (shorter lists are padded)
    S = 4
    tids = torch.full((1, 1, len(token_ids), S), PAD, dtype=torch.int64)
    for j, t in enumerate(token_ids):
        tids[0, 0, j, : len(t)] = torch.tensor(t)
    return PageLayout(page_ids=torch.arange(len(token_ids)).view(1, 1, -1), token_ids=tids,
                      lengths=(tids >= 0).sum(-1).to(torch.int32), num_pages=torch.tensor([[num_pages]]),
                      num_tokens=n_tokens)


def test_written_pages_hide_what_the_memory_held():
    pool = PagePool(1, 1, 4, 3, dtype=torch.float32, capacity=2, pin=False)
    assert pool._kv_fill is None  # tracked pools skip the zero fill
    pool.k.fill_(float("nan"))  # stands for whatever the allocation returned
    pool.v.fill_(float("nan"))
    keys = torch.arange(18, dtype=torch.float32).view(1, 1, 6, 3)
    pool.write(_layout([[0, 2, 4], [1, 3, 5]], 2, 6), keys, -keys, base=0)
    for page, toks in ((0, [0, 2, 4]), (1, [1, 3, 5])):
        assert torch.equal(pool.k[0, 0, page, :3], keys[0, 0, toks])
        assert torch.equal(pool.v[0, 0, page, :3], -keys[0, 0, toks])
        assert torch.equal(pool.k[0, 0, page, 3], torch.zeros(3)), "unused slots are zeroed"
    # growth keeps the written pages; the new capacity holds garbage until written
    pool.ensure_capacity(3)
    new = torch.arange(100, 103, dtype=torch.float32).view(1, 1, 1, 3)
    # page 1 is rewritten with an old token moved in from page 0, page 2 is new
    pool.write(PageLayout(page_ids=torch.tensor([[[1, 2]]]),
                          token_ids=torch.tensor([[[[1, 3, 5, 0], [6, PAD, PAD, PAD]]]]),
                          lengths=torch.tensor([[[4, 1]]], dtype=torch.int32), num_pages=torch.tensor([[3]]),
                          num_tokens=7), new, -new, base=6)
    assert torch.equal(pool.k[0, 0, 1], keys[0, 0, [1, 3, 5, 0]])
    assert torch.equal(pool.k[0, 0, 2, 0], new[0, 0, 0])
    assert torch.equal(pool.k[0, 0, 2, 1:], torch.zeros(3, 3))
    assert not torch.isnan(pool.k[0, 0, :3]).any() and not torch.isnan(pool.v[0, 0, :3]).any()
    assert pool.lengths[0, 0].tolist() == [3, 4, 1, 0]  # grown to 4 pages; lengths stay zeroed


def test_slot_pools_start_zeroed():
    pool = PagePool(1, 2, 4, 3, dtype=torch.float32, capacity=3, pin=False, track_tokens=False)
    assert pool.k.abs().sum() == 0 and pool.v.abs().sum() == 0


def test_pin_mode_is_checked(monkeypatch):
    import pytest

    from kvpolicy.host_memory import PIN_ENV, pinned_empty

    monkeypatch.setenv(PIN_ENV, "mlock")
    with pytest.raises(ValueError, match="'register' or 'alloc'"):
        pinned_empty((4,), torch.float32)


def test_registration_without_a_cuda_runtime_declines():
    """Without CUDA, registering host memory declines (None) instead of raising: the caller falls back."""
    import pytest

    from kvpolicy.host_memory import _registered

    if torch.cuda.is_available():
        pytest.skip("a CUDA runtime is present")
    assert _registered(4096) is None
