"""``PagePool``: pages are written whole, so a pool's K/V need no zero fill (garbage never shows); chunked growth
keeps every page (any chunk size gives the same contents); allocation failures leave the pool as it was."""

from __future__ import annotations

import pytest
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
    pool = PagePool(1, 1, 4, 3, dtype=torch.float32, capacity=2, pin=False, chunk_pages=2)
    assert pool._kv_fill is None  # tracked pools skip the zero fill
    pool.k.fill_(float("nan"))  # stands for whatever the allocation returned
    pool.v.fill_(float("nan"))
    keys = torch.arange(18, dtype=torch.float32).view(1, 1, 6, 3)
    pool.write(_layout([[0, 2, 4], [1, 3, 5]], 2, 6), keys, -keys, base=0)
    for page, toks in ((0, [0, 2, 4]), (1, [1, 3, 5])):
        assert torch.equal(pool.k[0, 0, page, :3], keys[0, 0, toks])
        assert torch.equal(pool.v[0, 0, page, :3], -keys[0, 0, toks])
        assert torch.equal(pool.k[0, 0, page, 3], torch.zeros(3)), "unused slots are zeroed"
    # growth appends a chunk and keeps the written pages; the new chunk holds garbage until written
    pool.ensure_capacity(3)
    assert pool.num_chunks == 2 and pool.capacity == 4
    pool.v_chunks[1].fill_(float("nan"))
    new = torch.arange(100, 103, dtype=torch.float32).view(1, 1, 1, 3)
    # page 1 is rewritten with an old token moved in from page 0, page 2 is new
    pool.write(PageLayout(page_ids=torch.tensor([[[1, 2]]]),
                          token_ids=torch.tensor([[[[1, 3, 5, 0], [6, PAD, PAD, PAD]]]]),
                          lengths=torch.tensor([[[4, 1]]], dtype=torch.int32), num_pages=torch.tensor([[3]]),
                          num_tokens=7), new, -new, base=6)
    k, v = pool.read_range(0, 3)  # [1, 1, 3, S, D] across both chunks
    assert torch.equal(k[0, 0, 1], keys[0, 0, [1, 3, 5, 0]])
    assert torch.equal(k[0, 0, 2, 0], new[0, 0, 0])
    assert torch.equal(k[0, 0, 2, 1:], torch.zeros(3, 3))
    assert not torch.isnan(k).any() and not torch.isnan(v).any()
    assert pool.lengths[0, 0, :4].tolist() == [3, 4, 1, 0]  # grown to 4 pages; lengths stay zeroed
    with pytest.raises(RuntimeError, match="2 chunks"):
        pool.k  # noqa: B018 (one tensor only for a pool held in one chunk)


def test_slot_pools_start_zeroed():
    pool = PagePool(1, 2, 4, 3, dtype=torch.float32, capacity=3, pin=False, track_tokens=False)
    assert pool.k.abs().sum() == 0 and pool.v.abs().sum() == 0


def test_pin_mode_is_checked(monkeypatch):
    from kvpolicy.host_memory import PIN_ENV, pinned_empty

    monkeypatch.setenv(PIN_ENV, "mlock")
    with pytest.raises(ValueError, match="'register' or 'alloc'"):
        pinned_empty((4,), torch.float32)


def test_registration_without_a_cuda_runtime_declines():
    """Without CUDA, registering host memory declines (None) instead of raising: the caller falls back."""
    from kvpolicy.host_memory import _registered

    if torch.cuda.is_available():
        pytest.skip("a CUDA runtime is present")
    assert _registered(4096) is None


def _writes(pool: PagePool, steps: int, seed: int) -> None:
    """A build of 5 positional pages, then ``steps`` adds: each writes one new page and rewrites an older page with
    its tokens in another order (as a semantic index moves tokens). B=2, Hkv=3, S=4, D=5."""
    g = torch.Generator().manual_seed(seed)
    B, H, S, D = 2, 3, 4, 5
    tids = torch.arange(20).view(1, 1, 5, S).expand(B, H, 5, S).clone()
    tids[:, :, 4, 2:] = PAD  # a short last page
    first = PageLayout(page_ids=torch.arange(5).expand(B, H, 5), token_ids=tids, lengths=(tids >= 0).sum(-1).int(),
                       num_pages=torch.full((B, H), 5), num_tokens=18)
    pool.write(first, _tokens(g, B, H, 18, D), _tokens(g, B, H, 18, D), base=0)
    n, pages = 18, 5
    for _ in range(steps):
        j = int(torch.randint(0, pages, (1,), generator=g))
        old = pool.token_ids[:, :, j].clone()  # [B, H, S]
        perm = torch.randperm(S, generator=g)
        moved = old[:, :, perm]
        new = torch.full((B, H, S), PAD, dtype=torch.int64)
        new[:, :, :3] = torch.arange(n, n + 3)
        layout = PageLayout(page_ids=torch.tensor([j, pages]).expand(B, H, 2),
                            token_ids=torch.stack([moved, new], dim=2),
                            lengths=torch.stack([(moved >= 0).sum(-1), (new >= 0).sum(-1)], dim=2).int(),
                            num_pages=torch.full((B, H), pages + 1), num_tokens=n + 3)
        pool.write(layout, _tokens(g, B, H, 3, D), _tokens(g, B, H, 3, D), base=n)
        n, pages = n + 3, pages + 1


def _tokens(g, B, H, n, D):
    mag = torch.logspace(-2, 2, B * H, dtype=torch.float32).view(B, H, 1, 1)  # one magnitude per head
    return torch.randn(B, H, n, D, generator=g) * mag


@pytest.mark.parametrize("pool_dtype", ["auto", "fp8"])
def test_chunked_pool_reproduces_the_unchunked_pool(pool_dtype):
    """The same writes into one big chunk and into chunks of 2 or 3 pages (growth crossing chunk boundaries many
    times) give the same pages, lengths, scales and token maps."""
    pools = [PagePool(2, 3, 4, 5, dtype=torch.float32, capacity=c, pool_dtype=pool_dtype, chunk_pages=cp, pin=False)
             for c, cp in ((64, 64), (0, 2), (1, 3))]
    for pool in pools:
        _writes(pool, steps=12, seed=3)
    ref = pools[0]
    assert ref.num_chunks == 1 and pools[1].num_chunks == 9 and pools[2].num_chunks == 6
    P = 17
    rk, rv = ref.read_range(0, P)
    for pool in pools[1:]:
        k, v = pool.read_range(0, P)
        assert torch.equal(k, rk) and torch.equal(v, rv)
        assert torch.equal(pool.lengths[:, :, :P], ref.lengths[:, :, :P])
        assert torch.equal(pool.token_ids[:, :, :P], ref.token_ids[:, :, :P])
        assert torch.equal(pool.token_page, ref.token_page) and torch.equal(pool.token_offset, ref.token_offset)
        if pool_dtype == "fp8":
            assert torch.equal(pool.k_scale[:, :, :P], ref.k_scale[:, :, :P])
        rows = torch.tensor([0, 5, 3, 1, 4])
        pages = torch.tensor([16, 0, 7, 9, 2])
        for a, b in zip(pool.read_pages(rows, pages), ref.read_pages(rows, pages)):
            assert torch.equal(a, b)
        assert torch.equal(pool.read_pages(rows, pages)[0], rk.view(6, P, 4, 5)[rows, pages])
    assert pools[1].capacity == 18 and pools[2].capacity == 18  # whole chunks: at most one chunk past the need


def test_fp8_pool_round_trip_error_is_bounded():
    """Every element of an fp8 page comes back within 1/16 of itself, plus e4m3's subnormal step (2**-9 of the
    page's scale); so within 1/16 of the page's largest magnitude."""
    g = torch.Generator().manual_seed(0)
    B, H, S, D, P = 2, 4, 16, 32, 9
    x = torch.randn(B, H, P * S, D, generator=g) * torch.logspace(-4, 3, P * S).view(1, 1, -1, 1)
    x[0, 1, :S] = 0  # an all-zero page
    x[1, 2, 5] = 3e4  # one outlier
    pool = PagePool(B, H, S, D, dtype=torch.float32, pool_dtype="fp8", pin=False)
    ids = torch.arange(P * S).view(1, 1, P, S).expand(B, H, P, S)
    pool.write(PageLayout(page_ids=torch.arange(P).expand(B, H, P), token_ids=ids,
                          lengths=torch.full((B, H, P), S, dtype=torch.int32), num_pages=torch.full((B, H), P),
                          num_tokens=P * S), x, -x, base=0)
    assert pool.k_chunks[0].dtype == torch.float8_e4m3fn
    k, v = pool.read_range(0, P)  # [B, H, P, S, D] float32
    xs = x.view(B, H, P, S, D)
    err = (k - xs).abs()
    amax = xs.abs().amax(dim=(-2, -1), keepdim=True)
    assert bool((err <= amax / 16).all())
    assert bool((err <= xs.abs() / 16 + pool.k_scale[:, :, :P, None, None] * 2**-9 + 1e-30).all())
    assert torch.equal(v, -k)
    assert bool((k[0, 1, 0] == 0).all()) and pool.k_scale[0, 1, 0] == 0  # zero page: scale 0, zeros back
    assert torch.allclose(pool.k_scale[:, :, :P], amax.view(B, H, P) / 448)


def test_fp8_pool_reports_its_bytes():
    a = PagePool(1, 8, 16, 128, dtype=torch.bfloat16, capacity=64, pin=False)
    b = PagePool(1, 8, 16, 128, dtype=torch.bfloat16, capacity=64, pin=False, pool_dtype="fp8")
    scales = 2 * b.k_scale.nbytes
    assert b.kv_nbytes == a.kv_nbytes // 2 + scales and scales == 2 * 8 * 64 * 4
    assert b.page_nbytes() == a.page_nbytes() // 2 + 8
    assert b.nbytes - b.kv_nbytes == a.nbytes - a.kv_nbytes


def test_unknown_pool_dtype_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'fp16'.*valid: 'auto', 'fp8'"):
        PagePool(1, 1, 4, 3, dtype=torch.float32, pool_dtype="fp16")
    from kvpolicy.policy import Policy

    with pytest.raises(ValueError, match=r"valid: 'auto', 'fp8'"):
        Policy.preset("full", cpu_pool_dtype="int4")
    with pytest.raises(ValueError, match="slots hold the model dtype"):
        PagePool(1, 1, 4, 3, dtype=torch.float32, pool_dtype="fp8", track_tokens=False)


def test_fp8_without_torch_support_is_a_clear_error(monkeypatch):
    from kvpolicy.pool_dtype import check_pool_dtype

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="needs torch.float8_e4m3fn, which torch .* lacks"):
        check_pool_dtype("fp8")
    assert check_pool_dtype("auto") == "auto"


def test_failed_growth_names_the_bytes_and_changes_nothing(monkeypatch):
    import kvpolicy.pool as pool_mod
    from kvpolicy.errors import HostMemoryError

    pool = PagePool(2, 3, 4, 5, dtype=torch.float32, chunk_pages=2, pin=False)
    _writes(pool, steps=1, seed=1)
    before = (pool.capacity, pool.num_chunks, pool.lengths, pool.token_ids, pool.nbytes)
    k0 = pool.read_range(0, 6)[0].clone()
    real = pool_mod._empty
    calls = []

    def failing(shape, dtype, device, pin, fill=None):
        calls.append(shape)
        if len(calls) == 3:  # the second K chunk: one chunk of K and V each were made already
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(shape, dtype, device, pin, fill)

    monkeypatch.setattr(pool_mod, "_empty", failing)
    with pytest.raises(HostMemoryError, match=r"could not allocate 3.75 KiB \(3840 bytes\) .* from 6 to 10 pages.*this pool holds"):
        pool.ensure_capacity(9)
    assert (pool.capacity, pool.num_chunks, pool.lengths, pool.token_ids, pool.nbytes) == before
    assert torch.equal(pool.read_range(0, 6)[0], k0)
    monkeypatch.setattr(pool_mod, "_empty", real)
    pool.ensure_capacity(9)
    assert pool.capacity == 10 and torch.equal(pool.read_range(0, 6)[0], k0)
