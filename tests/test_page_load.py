"""kvpolicy_kernels.page_load and the ``uva`` transfer: the kernel against its torch reference (Triton interpreter on
CPU, compiled on CUDA with a pinned host source), the transfer's CPU fallback, and whole-policy equivalence."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.pool import PagePool

_INTERP = textwrap.dedent(
    """
    import torch, triton
    from kvpolicy_kernels.page_load import _launch, load_pages_reference
    torch.manual_seed(0)
    cases = [(2, 3, 10, 5, 4, 8, 4, 16), (1, 2, 7, 7, 16, 4, 7, 32), (1, 1, 3, 2, 2, 2, 0, 4)]
    for (B, H, C, N, S, D, K, blk) in cases:
        for Cc, fp8 in ((C, False), (3, False), (C, True), (4, True)):  # one tensor, chunks; fp8 with scales
            n = -(-C // Cc)
            mag = torch.logspace(-3, 3, B * H * n * Cc).view(B, H, n * Cc, 1, 1)
            sk, sv = torch.randn(B, H, n * Cc, S, D) * mag, torch.randn(B, H, n * Cc, S, D)
            LC = n * Cc + 5  # metadata rows are longer than the pages held
            sl = torch.randint(0, S + 1, (B, H, LC), dtype=torch.int32)
            ks = vs = None
            if fp8:
                ks, vs = sk.abs().amax((-2, -1)) / 448, sv.abs().amax((-2, -1)) / 448
                sk, sv = (sk / ks[..., None, None]).to(torch.float8_e4m3fn), (sv / vs[..., None, None]).to(torch.float8_e4m3fn)
                ks, vs = torch.cat([ks, torch.zeros(B, H, 5)], 2), torch.cat([vs, torch.zeros(B, H, 5)], 2)
            kc = [sk[:, :, i * Cc:(i + 1) * Cc].contiguous() for i in range(n)]
            vc = [sv[:, :, i * Cc:(i + 1) * Cc].contiguous() for i in range(n)]
            ids = torch.stack([torch.randperm(C)[:K] for _ in range(B * H)]).view(B, H, K)
            slots = torch.stack([torch.randperm(N)[:K] for _ in range(B * H)]).view(B, H, K)
            if K:
                ids[0, 0, 0] = -1
            outs = []
            for kernel in (False, True):
                dk = torch.full((B, H, N, S, D), float("nan")); dv = dk.clone()
                dl = torch.full((B, H, N), -7, dtype=torch.int32)
                if kernel:
                    _launch(kc, vc, sl, ids, slots, dk, dv, dl, ks, vs, None, blk)
                else:
                    load_pages_reference(kc, vc, sl, ids, slots, dk, dv, dl, k_scale=ks, v_scale=vs)
                outs.append([torch.nan_to_num(t.float(), nan=1e9) for t in (dk, dv, dl)])
            assert all(torch.equal(a, b) for a, b in zip(*outs)), (B, H, C, N, S, D, K, Cc, fp8)
            for b in range(B):  # and the reference is the definition: page ids[b, h, j] of the whole pool
                for h in range(H):
                    for j in range(K):
                        p, s = int(ids[b, h, j]), int(slots[b, h, j])
                        if p < 0:
                            continue
                        want = sk[b, h, p].float() * (ks[b, h, p] if fp8 else 1)
                        assert torch.equal(outs[0][0][b, h, s], want) and outs[0][2][b, h, s] == sl[b, h, p]
    print("ok")
    """
)


def test_page_load_kernel_matches_reference_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _INTERP], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def _pools(B=1, H=2, C=12, N=6, S=4, D=8, dtype=torch.float32, dst_device="cpu", pin=False):
    src = PagePool(B, H, S, D, dtype=dtype, device="cpu", capacity=C, pin=pin, track_tokens=False)
    src.k.copy_(torch.randn_like(src.k, dtype=torch.float32).to(dtype))
    src.v.copy_(torch.randn_like(src.v, dtype=torch.float32).to(dtype))
    src.lengths.copy_(torch.randint(1, S + 1, src.lengths.shape, dtype=torch.int32))
    dst = PagePool(B, H, S, D, dtype=dtype, device=dst_device, capacity=N, pin=False, track_tokens=False)
    return src, dst


def test_uva_transfer_falls_back_to_a_plain_copy_on_cpu():
    from kvpolicy.transfers.sync_transfer import SyncTransfer
    from kvpolicy.transfers.uva_transfer import UVATransfer

    torch.manual_seed(1)
    src, dst_a = _pools()
    _, dst_b = _pools()
    ids = torch.tensor([[[3, -1, 7], [0, 11, 5]]])
    slots = torch.tensor([[[0, 4, 5], [1, 2, 3]]])
    for tr, dst in ((UVATransfer(), dst_a), (SyncTransfer(), dst_b)):
        h = tr.submit(src, ids, dst, slots)
        tr.wait(h)
        assert int(h.num_pages) == 5
    assert torch.equal(dst_a.k, dst_b.k) and torch.equal(dst_a.v, dst_b.v) and torch.equal(dst_a.lengths, dst_b.lengths)
    with pytest.raises(ValueError, match=r"\[B, Hkv, K\]"):
        UVATransfer().submit(src, ids, dst_a, slots[..., :2])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S,D", [(16, 128), (16, 64), (1, 64)])
def test_page_load_from_pinned_host_is_bit_exact(dtype, S, D):
    from kvpolicy_kernels.page_load import load_pages, load_pages_reference

    torch.manual_seed(2)
    B, H, C, N, K = 2, 4, 64, 24, 20
    src, dst = _pools(B, H, C, N, S, D, dtype, "cuda", pin=True)
    _, ref = _pools(B, H, C, N, S, D, dtype, "cuda")
    ids = torch.stack([torch.randperm(C)[:K] for _ in range(B * H)]).view(B, H, K)
    ids[ids % 5 == 0] = -1
    slots = torch.stack([torch.randperm(N)[:K] for _ in range(B * H)]).view(B, H, K)
    for pool in (dst, ref):
        pool.k.fill_(float("nan"))
        pool.v.fill_(float("nan"))
    load_pages(src.k, src.v, src.lengths, ids.cuda(), slots.cuda(), dst.k, dst.v, dst.lengths)
    load_pages_reference(src.k, src.v, src.lengths, ids, slots, ref.k, ref.v, ref.lengths)
    torch.cuda.synchronize()
    for a, b in ((dst.k, ref.k), (dst.v, ref.v)):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))  # untouched slots stay NaN in both
    assert torch.equal(dst.lengths, ref.lengths)


@pytest.mark.cuda
def test_page_load_rejects_pageable_host_memory():
    from kvpolicy_kernels.page_load import load_pages

    src, dst = _pools(dst_device="cuda", pin=False)
    ids = torch.zeros((1, 2, 1), dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="pageable"):
        load_pages(src.k, src.v, src.lengths, ids, ids, dst.k, dst.v, dst.lengths)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["icecache", "quest", "exact-topk"])
def test_uva_transfer_decodes_like_the_default_transfer(preset):
    from kvpolicy.hf import KVPolicyCache
    from kvpolicy.policy import Policy
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=6).cuda()
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(4)).cuda()
    base = Policy.preset(preset, budget=128)
    outs = []
    for transfer in (base.to_config().get("transfer", "sync"), "uva"):
        pol = Policy.from_config({**base.to_config(), "transfer": transfer})
        cache = KVPolicyCache(model, pol)
        with torch.inference_mode():
            outs.append(model.generate(ids, **cache_kwargs(cache), max_new_tokens=40, do_sample=False))
        model.set_attn_implementation("sdpa")
        assert cache.stats()["pages_moved"] > 0
    assert torch.equal(outs[0], outs[1])


def _chunked_pool(pool_dtype: str, *, B=2, H=3, S=4, D=8, P=11, chunk_pages=3, dtype=torch.float32, pin=False):
    """A CPU pool of ``P`` written pages per row in chunks of ``chunk_pages`` (values of very different
    magnitudes per page, so that fp8 scales differ)."""
    from kvpolicy.types import PageLayout

    g = torch.Generator().manual_seed(5)
    pool = PagePool(B, H, S, D, dtype=dtype, pool_dtype=pool_dtype, chunk_pages=chunk_pages, pin=pin)
    x = torch.randn(2, B, H, P * S, D, generator=g) * torch.logspace(-2, 2, P * S).view(1, 1, 1, -1, 1)
    ids = torch.arange(P * S).view(1, 1, P, S).expand(B, H, P, S).clone()
    ids[:, :, -1, 1:] = -1  # a short last page
    lengths = (ids >= 0).sum(-1).to(torch.int32)
    pool.write(PageLayout(page_ids=torch.arange(P).expand(B, H, P), token_ids=ids, lengths=lengths,
                          num_pages=torch.full((B, H), P), num_tokens=P * S), x[0].to(dtype), x[1].to(dtype), base=0)
    return pool


@pytest.mark.parametrize("pool_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("transfer", ["sync", "bulk_load", "uva"])
def test_transfers_from_a_chunked_pool_load_what_the_pool_reads(transfer, pool_dtype):
    """Every transfer moves pages of a chunked (and fp8) pool into slots as ``PagePool.read_pages`` reads them."""
    from kvpolicy.registry import get_registry

    src = _chunked_pool(pool_dtype)
    assert src.num_chunks == 4
    dst = PagePool(2, 3, 4, 8, dtype=torch.float32, capacity=6, pin=False, track_tokens=False)
    ids = torch.tensor([[[3, -1, 10, 0], [9, 2, 5, 6], [1, 4, 7, 8]],
                        [[-1, -1, 10, 3], [0, 1, 2, 9], [8, -1, 4, 6]]])  # [B=2, H=3, 4]: pages in 4 chunks
    slots = torch.tensor([0, 5, 2, 4]).expand(2, 3, 4)
    tr = get_registry().get("transfer", transfer)()
    h = tr.submit(src, ids, dst, slots)
    tr.wait(h)
    assert int(h.num_pages) == int((ids >= 0).sum())
    assert int(h.nbytes) == int((ids >= 0).sum()) * src.page_nbytes()
    b, hh, j = (ids >= 0).nonzero(as_tuple=True)
    k, v = src.read_pages(b * 3 + hh, ids[b, hh, j])
    assert torch.equal(dst.k[b, hh, slots[b, hh, j]], k) and torch.equal(dst.v[b, hh, slots[b, hh, j]], v)
    assert torch.equal(dst.lengths[b, hh, slots[b, hh, j]], src.lengths[b, hh, ids[b, hh, j]])


@pytest.mark.cuda
@pytest.mark.parametrize("pool_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_page_load_from_a_chunked_pinned_pool_matches_the_reference(pool_dtype, dtype):
    """The kernel reads a pinned pool of many chunks (and fp8 with scales) exactly as the torch reference does."""
    from kvpolicy_kernels.page_load import load_pages, load_pages_reference

    if pool_dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversions need compute capability 8.9")
    src = _chunked_pool(pool_dtype, B=2, H=4, S=16, D=128, P=100, chunk_pages=16, dtype=dtype, pin=True)
    assert src.num_chunks == 7 and src.k_chunks[0].is_pinned() and src.lengths.is_pinned()
    N, K = 24, 20
    ids = torch.stack([torch.randperm(100)[:K] for _ in range(8)]).view(2, 4, K)
    ids[ids % 5 == 0] = -1
    slots = torch.stack([torch.randperm(N)[:K] for _ in range(8)]).view(2, 4, K)
    outs = []
    for kernel in (True, False):
        dst = PagePool(2, 4, 16, 128, dtype=dtype, device="cuda", capacity=N, pin=False, track_tokens=False)
        dst.k.fill_(float("nan"))
        dst.v.fill_(float("nan"))
        run = load_pages if kernel else load_pages_reference
        extra = {"tables": src.chunk_tables("cuda")} if kernel else {}
        run(src.k_chunks, src.v_chunks, src.lengths, ids.cuda() if kernel else ids, slots.cuda() if kernel else slots,
            dst.k, dst.v, dst.lengths, k_scale=src.k_scale, v_scale=src.v_scale, **extra)
        torch.cuda.synchronize()
        outs.append(dst)
    a, b = outs
    for x, y in ((a.k, b.k), (a.v, b.v)):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    assert torch.equal(a.lengths, b.lengths)
    bb, hh, j = (ids >= 0).nonzero(as_tuple=True)
    k, _ = src.read_pages(bb * 4 + hh, ids[bb, hh, j])
    assert torch.equal(a.k[bb, hh, slots[bb, hh, j]].cpu(), k)


@pytest.mark.cuda
@pytest.mark.parametrize("transfer", ["bulk_load", "uva"])
def test_fp8_pool_decodes_alike_with_every_transfer(transfer):
    """An fp8 CPU pool: the uva kernel and the bulk copy dequantise on the GPU as the sync transfer does, so
    decoding is token for token the same (and the pages moved are fp8: half the bytes of bf16)."""
    from kvpolicy.hf import KVPolicyCache
    from kvpolicy.policy import Policy
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=4).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(4)).cuda()
    outs, moved = [], []
    for tr in ("sync", transfer):
        pol = Policy.preset("quest", budget=128, transfer=tr, cpu_pool_dtype="fp8")
        cache = KVPolicyCache(model, pol)
        with torch.inference_mode():
            outs.append(model.generate(ids, **cache_kwargs(cache), max_new_tokens=40, do_sample=False))
        model.set_attn_implementation("sdpa")
        st = cache.stats()
        moved.append((st["pages_moved"], st["bytes_moved"]))
        assert cache.layers[cache.policy_layers[0]].state.kv.cpu_pool.k_chunks[0].dtype == torch.float8_e4m3fn
    assert torch.equal(outs[0], outs[1])
    pages, nbytes = moved[1]
    assert pages > 0 and nbytes == pages * (2 * 16 * 16 + 8)  # S=16, D=16: fp8 K and V plus two scales
