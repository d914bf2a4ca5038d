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
    from kvpolicy_kernels.page_load import _load_pages_kernel, load_pages_reference
    torch.manual_seed(0)
    for (B, H, C, N, S, D, K, blk) in [(2, 3, 10, 5, 4, 8, 4, 16), (1, 2, 7, 7, 16, 4, 7, 32), (1, 1, 3, 2, 2, 2, 0, 4)]:
        sk, sv = torch.randn(B, H, C, S, D), torch.randn(B, H, C, S, D)
        sl = torch.randint(0, S + 1, (B, H, C), dtype=torch.int32)
        ids = torch.stack([torch.randperm(C)[:K] for _ in range(B * H)]).view(B, H, K)
        slots = torch.stack([torch.randperm(N)[:K] for _ in range(B * H)]).view(B, H, K)
        if K:
            ids[0, 0, 0] = -1
        outs = []
        for kernel in (False, True):
            dk = torch.full((B, H, N, S, D), float("nan")); dv = dk.clone()
            dl = torch.full((B, H, N), -7, dtype=torch.int32)
            if not kernel:
                load_pages_reference(sk, sv, sl, ids, slots, dk, dv, dl)
            elif K:
                grid = (B * H * K, triton.cdiv(S * D, blk))
                _load_pages_kernel[grid](sk, sv, sl, ids, slots, dk, dv, dl, K, C, N, ROW=S * D, BLOCK=blk)
            outs.append([torch.nan_to_num(t.float(), nan=1e9) for t in (dk, dv, dl)])
        assert all(torch.equal(a, b) for a, b in zip(*outs)), (B, H, C, N, S, D, K)
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
