"""Triton kernels (``kernels/``) against their torch references.

* ``cuda``-marked tests compare every launcher with its reference on the GPU (many shapes, bf16 and fp32).
* ``test_interpreter_*`` run the same kernels on CPU under the Triton interpreter, in a subprocess (so that
  ``TRITON_INTERPRET=1`` is set before triton is imported), at small shapes; skipped without triton.
* The rest are plain CPU tests: references against naive loops, the dispatch switch, input errors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kvpolicy_kernels._checks import check_paged_attention_inputs

from kvpolicy import attention as attn
from kvpolicy.attention import attention_backend, decode_attention, paged_decode_attention
from kvpolicy.ops import gqa_merge

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'kvpolicy[gpu]')")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ inputs
def attention_inputs(B, Hkv, G, D, Ts, Tw, N, S, K, *, dtype=torch.float32, device="cpu", seed=0, drop=0.25,
                     empty_rows=()):
    """Random paged-attention inputs: ragged pages (slot_len in [0, S], garbage past it), distinct slots per
    (b, h) with some -1 (also in the middle), sink and window of Ts/Tw tokens; rows in ``empty_rows``
    ((b, h) pairs) select nothing."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rnd(B, Hkv * G, D)
    sink_k, sink_v, win_k, win_v = rnd(B, Hkv, Ts, D), rnd(B, Hkv, Ts, D), rnd(B, Hkv, Tw, D), rnd(B, Hkv, Tw, D)
    slot_k, slot_v = rnd(B, Hkv, N, S, D), rnd(B, Hkv, N, S, D)
    slot_len = torch.randint(0, S + 1, (B, Hkv, N), generator=g, dtype=torch.int32)
    tail = torch.arange(S).view(1, 1, 1, S, 1) >= slot_len.unsqueeze(-1).unsqueeze(-1)
    slot_k = slot_k.masked_fill(tail, 300.0)  # masked tokens must not count
    slot_v = slot_v.masked_fill(tail, -300.0)
    assert K <= N
    slots = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * Hkv)] or [torch.zeros(K)])
    slots = slots[: B * Hkv].reshape(B, Hkv, K).long()
    slots = torch.where(torch.rand(B, Hkv, K, generator=g) < drop, -1, slots)
    for b, h in empty_rows:
        slots[b, h] = -1
    args = (q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v)
    return tuple(t.to(device) for t in args)


def fp32_reference(args, scaling, softcap=None):
    """Reference over the same (possibly bf16) inputs, computed and returned in float32."""
    wide = [t.float() if t.is_floating_point() else t for t in args]
    return paged_decode_attention(*wide, scaling, softcap)


def valid_rows(args):
    """[B, Hq] bool: rows with at least one token to attend to."""
    q, sink_k, _, _, _, slot_len, slots, win_k, _ = args
    B, Hq, _ = q.shape
    H = slots.shape[1]
    lens = torch.where(slots >= 0, slot_len.long().gather(2, slots.clamp(min=0)), 0)  # [B, H, K]
    n = lens.sum(-1) + sink_k.shape[2] + win_k.shape[2]  # [B, H]
    return (n > 0).repeat_interleave(Hq // H, dim=1)


def check_attention(out, args, scaling, softcap, *, atol, rtol):
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert torch.isfinite(out).all(), "every output element is written and finite"
    ref = fp32_reference(args, scaling, softcap)
    ok = valid_rows(args)
    torch.testing.assert_close(out.float()[ok], ref[ok], atol=atol, rtol=rtol)
    assert (out[~ok] == 0).all(), "rows with nothing to attend to are zeros"


# ------------------------------------------------------------------------------------------- CUDA tests
ATTN_CASES = [  # (Ts, Tw, N, S, K): sink/window empty or not, K from 0 to 300 (split-K), ragged pages
    (32, 16, 40, 16, 12),
    (0, 5, 400, 16, 300),
    (16, 0, 4, 16, 1),
    (0, 0, 64, 16, 37),
    (32, 7, 8, 16, 0),
    (3, 2, 70, 8, 64),
]


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("Hq", [2, 8, 14], ids=["G1", "G4", "G7"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "Ts{}-Tw{}-N{}-S{}-K{}".format(*c))
def test_paged_attention_matches_reference_cuda(case, D, Hq, dtype):
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    Ts, Tw, N, S, K = case
    args = attention_inputs(2, 2, Hq // 2, D, Ts, Tw, N, S, K, dtype=dtype, device="cuda", seed=K + D + Hq)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-4)
    for softcap in (None, 5.0):
        out = torch.full_like(args[0], float("nan"))
        paged_decode_attention_triton(*args, 1 / math.sqrt(D), softcap, out=out)
        check_attention(out, args, 1 / math.sqrt(D), softcap, **tol)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("pps", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_paged_attention_splits_dtypes_and_empty_rows_cuda(pps, dtype):
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    args = attention_inputs(3, 2, 4, 64, 0, 0, 100, 16, 90, dtype=dtype, device="cuda", empty_rows=[(1, 0), (2, 1)])
    out = torch.full_like(args[0], float("nan"))
    paged_decode_attention_triton(*args, 0.125, None, out=out, pages_per_split=pps)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    check_attention(out, args, 0.125, None, **tol)
    assert (out[1, :4] == 0).all() and (out[2, 4:] == 0).all()


@pytest.mark.cuda
@needs_triton
def test_paged_attention_strided_views_and_dispatch_cuda():
    """Views as the layer passes them (window slice of a larger buffer, query transposed) need no copies;
    ``decode_attention`` routes CUDA tensors to Triton and agrees with the reference."""
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    q, sk, sv, pk, pv, sl, slots, wk, wv = attention_inputs(2, 8, 4, 128, 32, 16, 300, 16, 250, dtype=torch.bfloat16,
                                                            device="cuda")
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # [B, Hq, D] with non-standard strides
    wk_buf = torch.randn(2, 8, 16 + 9, 128, device="cuda", dtype=torch.bfloat16)
    wk_buf[:, :, :16] = wk
    args = (q, sk, sv, pk, pv, sl, slots, wk_buf[:, :, :16], wv)
    out = paged_decode_attention_triton(*args, 1 / math.sqrt(128))
    check_attention(out, args, 1 / math.sqrt(128), None, atol=2e-2, rtol=2e-2)
    assert attention_backend(q) == "triton"
    torch.testing.assert_close(decode_attention(*args, 1 / math.sqrt(128)), out, atol=0, rtol=0)


@pytest.mark.cuda
@needs_triton
def test_paged_attention_empty_inputs_cuda():
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    for Ts, Tw, N, K in [(0, 0, 0, 0), (0, 0, 5, 0), (0, 0, 5, 3)]:
        args = attention_inputs(1, 2, 4, 64, Ts, Tw, N, 16, K, device="cuda", drop=1.0)
        out = torch.full_like(args[0], float("nan"))
        paged_decode_attention_triton(*args, 0.125, out=out)
        assert (out == 0).all()
    args = attention_inputs(0, 2, 4, 64, 4, 4, 5, 16, 3, device="cuda")
    assert paged_decode_attention_triton(*args, 0.125).shape == (0, 8, 64)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 50, 16, 128, 7), (1, 8, 1000, 16, 64, 3), (2, 2, 9, 5, 24, 0)])
def test_page_copy_matches_reference_cuda(shape, dtype):
    from kvpolicy_kernels.page_copy import gather_pages, gather_pages_ref, scatter_pages, scatter_pages_ref

    B, H, C, S, D, K = shape
    g = torch.Generator().manual_seed(C)
    pool = torch.randn(B, H, C, S, D, generator=g).to(dtype).cuda()
    ids = torch.randint(-1, C, (B, H, K), generator=g).cuda()
    assert torch.equal(gather_pages(pool, ids), gather_pages_ref(pool, ids))
    slots = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B * H)]).view(B, H, K)
    slots = torch.where(torch.rand(B, H, K, generator=g) < 0.3, -1, slots).cuda()
    src = torch.randn(B, H, K, S, D, generator=g).to(dtype).cuda()
    assert torch.equal(scatter_pages(pool.clone(), slots, src), scatter_pages_ref(pool.clone(), slots, src))


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Hq", [2, 8, 14])
@pytest.mark.parametrize("D", [64, 128])
def test_page_scores_match_reference_cuda(D, Hq, dtype):
    from kvpolicy_kernels.page_scores import (
        exact_page_scores,
        exact_page_scores_ref,
        quest_page_scores,
        quest_page_scores_ref,
    )

    from kvpolicy.ops import topk_pages

    B, H, C, S = 2, 2, 300, 16
    g = torch.Generator().manual_seed(D + Hq)
    q = torch.randn(B, Hq, D, generator=g).to(dtype).cuda()
    pool = torch.randn(B, H, C, S, D, generator=g).to(dtype).cuda()
    lens = torch.randint(0, S + 1, (B, H, C), generator=g, dtype=torch.int32).cuda()
    got, ref = exact_page_scores(q, pool, lens), exact_page_scores_ref(q, pool, lens)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)) and torch.isneginf(ref).any()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-3, rtol=1e-3)
    lo = torch.randn(B, H, C, D, generator=g).cuda()
    hi = lo + torch.rand(B, H, C, D, generator=g).cuda()
    num = torch.tensor([[C, 17], [0, 299]]).cuda()
    got, ref = quest_page_scores(q, lo, hi, num), quest_page_scores_ref(q, lo, hi, num)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)
    ids = topk_pages(got, 16, H)
    assert ids.shape == (B, H, 16) and ids.device.type == "cuda"
    assert (ids[1, 0] == -1).all() and (ids[0, 1] < 17).all()


def token_pages(B, H, T, C, S, g) -> torch.Tensor:
    """A page table over a token-ordered key store, as the dci_tree index keeps it: every token in one page,
    pages filled from the front with ragged lengths, the last pages empty. -> [B, H, C, S] int64 (-1: empty)."""
    out = torch.full((B, H, C, S), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            perm, at = torch.randperm(T, generator=g), 0
            for c in range(C - 2):
                n = min(int(torch.randint(1, S + 1, (1,), generator=g)), T - at)
                out[b, h, c, :n] = perm[at : at + n]
                at += n
    return out


def check_token_page_scores(q, keys, page_tok) -> None:
    """The kernel against its reference, over all pages and under a random page mask (pages left out score
    -inf, the others exactly as without the mask)."""
    from kvpolicy_kernels.page_scores import token_page_scores, token_page_scores_ref

    got, ref = token_page_scores(q, keys, page_tok), token_page_scores_ref(q, keys, page_tok)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)) and torch.isneginf(ref).any()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)
    B, H, C = page_tok.shape[:3]
    mask = torch.rand(B, H, C, generator=torch.Generator().manual_seed(C)).to(page_tok.device) < 0.4
    got_m = token_page_scores(q, keys, page_tok, mask)
    ref_m = token_page_scores_ref(q, keys, page_tok, mask)
    assert torch.equal(torch.isneginf(got_m), torch.isneginf(ref_m))
    G = q.shape[1] // H
    assert torch.isneginf(got_m.view(B, H, G, C)[~mask.unsqueeze(2).expand(B, H, G, C)]).all()
    assert torch.equal(got_m[torch.isfinite(ref_m)], got[torch.isfinite(ref_m)])


def check_pool_page_scores(q, chunks, lengths, k_scale=None) -> None:
    """The chunked-pool kernel against its reference (fp8 chunks dequantised by their scales), over all pages
    (more pages than the chunks hold: those are empty) and under a random page mask."""
    from kvpolicy_kernels.page_scores import pool_page_scores, pool_page_scores_ref

    got = pool_page_scores(q, chunks, lengths, k_scale=k_scale)
    ref = pool_page_scores_ref(q, chunks, lengths, k_scale=k_scale)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)) and torch.isneginf(ref).any()
    fin = torch.isfinite(ref)
    assert fin.any()
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)
    B, H, C = lengths.shape
    mask = torch.rand(B, H, C, generator=torch.Generator().manual_seed(C)).to(q.device) < 0.4
    got_m = pool_page_scores(q, chunks, lengths, k_scale=k_scale, mask=mask)
    ref_m = pool_page_scores_ref(q, chunks, lengths, k_scale=k_scale, mask=mask)
    assert torch.equal(torch.isneginf(got_m), torch.isneginf(ref_m))
    assert torch.equal(got_m[torch.isfinite(ref_m)], got[torch.isfinite(ref_m)])


def pool_chunks(B, H, Cc, n_chunks, S, D, g, *, fp8=False, pin=False):
    """Random K chunks ``[B, H, Cc, S, D]`` (bf16, or fp8 with float32 per-page scales) and page lengths in
    [0, S] for ``n_chunks * Cc + 5`` pages (the last five past the chunks, so empty)."""
    C = n_chunks * Cc + 5
    chunks = [torch.randn(B, H, Cc, S, D, generator=g).to(torch.float8_e4m3fn if fp8 else torch.bfloat16)
              for _ in range(n_chunks)]
    if pin:
        chunks = [c.pin_memory() for c in chunks]
    lengths = torch.randint(0, S + 1, (B, H, C), generator=g, dtype=torch.int32)
    lengths[:, :, n_chunks * Cc:] = 0
    scale = torch.rand(B, H, C + 3, generator=g) + 0.5 if fp8 else None
    return chunks, lengths, scale


@pytest.mark.cuda
@needs_triton
def test_window_length_on_the_device_cuda():
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    check_window_length(paged_decode_attention_triton, device="cuda")


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("store", ["device", "pinned"])
def test_token_page_scores_match_reference_cuda(D, G, store):
    """Keys on the GPU, or in pinned host memory read through unified addressing (the dci_tree keys_on_host
    mode)."""
    g = torch.Generator().manual_seed(D + G)
    keys = torch.randn(3, 2, 5000, D, generator=g).to(torch.bfloat16)
    keys = keys.cuda() if store == "device" else keys.pin_memory()
    check_token_page_scores(torch.randn(3, 2 * G, D, generator=g).cuda(), keys,
                            token_pages(3, 2, 5000, 400, 16, g).cuda())


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("fp8", [False, True])
def test_pool_page_scores_match_reference_cuda(G, fp8):
    """Pinned host chunks read through unified addressing (the dci_tree index reading the CPU pool's keys)."""
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversions need compute capability 8.9")
    g = torch.Generator().manual_seed(G)
    chunks, lengths, scale = pool_chunks(2, 2, 64, 5, 16, 128, g, fp8=fp8, pin=True)
    check_pool_page_scores(torch.randn(2, 2 * G, 128, generator=g).cuda(), chunks, lengths.cuda(),
                           None if scale is None else scale.pin_memory())


def check_window_length(fn, device="cpu") -> None:
    """``fn`` over a window buffer of 40 tokens with ``win_len`` valid (a device scalar) equals ``fn`` over the
    first ``win_len`` tokens only: the fixed-shape form a captured decode step uses."""
    for Tw in (0, 1, 17, 40):
        args = attention_inputs(1, 2, 4, 32, 3, 40, 12, 4, 9, seed=Tw, device=device)
        q, sk, sv, pk, pv, sl, slots, wk, wv = args
        wl = torch.tensor([Tw], device=device)
        full = fn(q, sk, sv, pk, pv, sl, slots, wk.clone(), wv.clone(), 0.2, None, win_len=wl)
        cut = fn(q, sk, sv, pk, pv, sl, slots, wk[:, :, :Tw], wv[:, :, :Tw], 0.2, None)
        torch.testing.assert_close(full, cut, atol=2e-5, rtol=1e-4)


def test_window_length_on_the_device_matches_a_sliced_window():
    check_window_length(paged_decode_attention)


# ----------------------------------------------------------------------------------- interpreter (CPU)
def _interpret(check: str) -> None:
    """Run ``_interpreter_check(check)`` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"import tests.test_kernels as t; t._interpreter_check({check!r}); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def _interpreter_check(check: str) -> None:  # runs in the child, TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1"
    if check == "attention":
        from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

        cases = [  # (B, Hkv, G, D, Ts, Tw, N, S, K, dtype, softcap, pps, empty_rows)
            (1, 2, 4, 16, 3, 2, 12, 4, 9, torch.float32, None, None, ()),
            (2, 2, 1, 32, 0, 5, 40, 16, 30, torch.float32, 3.0, 4, [(1, 1)]),
            (1, 2, 7, 64, 17, 0, 20, 16, 13, torch.bfloat16, None, 4, ()),
            (1, 1, 4, 16, 0, 0, 30, 8, 25, torch.float16, None, 8, ()),
            (1, 2, 4, 16, 0, 0, 6, 4, 6, torch.float32, None, None, [(0, 0)]),
            (1, 2, 4, 16, 0, 0, 0, 16, 0, torch.float32, None, None, ()),
        ]
        for B, H, G, D, Ts, Tw, N, S, K, dtype, softcap, pps, empty in cases:
            args = attention_inputs(B, H, G, D, Ts, Tw, N, S, K, dtype=dtype, seed=K, empty_rows=empty)
            out = torch.full_like(args[0], float("nan"))
            paged_decode_attention_triton(*args, 1 / math.sqrt(D), softcap, out=out, pages_per_split=pps)
            tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
            check_attention(out, args, 1 / math.sqrt(D), softcap, **tol)
        check_window_length(paged_decode_attention_triton)
        q, sk, sv, pk, pv, sl, slots, wk, wv = attention_inputs(1, 2, 4, 16, 3, 2, 12, 4, 9)
        pv_t = pv.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other layout
        try:
            paged_decode_attention_triton(q, sk, sv, pk, pv_t, sl, slots, wk, wv, 0.25)
        except ValueError as e:
            assert "slot_k and slot_v must share one layout" in str(e)
        else:
            raise AssertionError("a slot pool layout mismatch must raise")
        wk_t, q_t = wk.transpose(-1, -2).contiguous().transpose(-1, -2), q.transpose(-1, -2).contiguous().transpose(-1, -2)
        args = (q_t, sk, sv, pk, pv, sl, slots.int(), wk_t, wv)  # strided q / window, int32 slots: still right
        check_attention(paged_decode_attention_triton(*args, 0.25), args, 0.25, None, atol=2e-5, rtol=1e-4)
    elif check == "copy":
        from kvpolicy_kernels.page_copy import (
            gather_pages,
            gather_pages_ref,
            scatter_pages,
            scatter_pages_ref,
        )

        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            pool = torch.randn(2, 3, 10, 4, 24, generator=g).to(dtype)
            ids = torch.randint(-1, 10, (2, 3, 5), generator=g)
            assert torch.equal(gather_pages(pool, ids), gather_pages_ref(pool, ids))
            slots = torch.stack([torch.randperm(10, generator=g)[:5] for _ in range(6)]).view(2, 3, 5)
            slots[0, 1, 2] = -1
            src = torch.randn(2, 3, 5, 4, 24, generator=g).to(dtype)
            assert torch.equal(scatter_pages(pool.clone(), slots, src), scatter_pages_ref(pool.clone(), slots, src))
            strided = pool.transpose(3, 4).contiguous().transpose(3, 4)  # any strides, no copies
            assert torch.equal(gather_pages(strided, ids), gather_pages_ref(pool, ids))
    elif check == "scores":
        from kvpolicy_kernels.page_scores import (
            exact_page_scores,
            exact_page_scores_ref,
            quest_page_scores,
            quest_page_scores_ref,
        )

        g = torch.Generator().manual_seed(0)
        for dtype, G in ((torch.float32, 1), (torch.bfloat16, 4), (torch.float32, 7)):
            q = torch.randn(2, 2 * G, 32, generator=g).to(dtype)
            pool = torch.randn(2, 2, 70, 4, 32, generator=g).to(dtype)
            lens = torch.randint(0, 5, (2, 2, 70), generator=g, dtype=torch.int32)
            got, ref = exact_page_scores(q, pool, lens), exact_page_scores_ref(q, pool, lens)
            assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
            torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-4, rtol=1e-4)
            keys = torch.randn(2, 2, 90, 32, generator=g).to(dtype)
            check_token_page_scores(torch.randn(2, 2 * G, 32, generator=g), keys, token_pages(2, 2, 90, 30, 4, g))
            chunks, lengths, scale = pool_chunks(2, 2, 4, 3, 4, 32, g, fp8=G == 4)
            check_pool_page_scores(torch.randn(2, 2 * G, 32, generator=g), chunks, lengths, scale)
            lo = torch.randn(2, 2, 70, 32, generator=g)
            hi = lo + torch.rand(2, 2, 70, 32, generator=g)
            num = torch.tensor([[70, 3], [0, 69]])
            for n in (None, num):
                got, ref = quest_page_scores(q, lo, hi, n), quest_page_scores_ref(q, lo, hi, n)
                assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
                torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-4, rtol=1e-4)
    else:
        raise ValueError(check)


def _interpreter_loops_broken() -> bool:
    """Triton 3.6's interpreter takes ``int()`` of a 1-element array for a loop bound held in a tensor, an error
    under numpy >= 2.5 (seen on the GPU machine: triton 3.6, numpy 2.5); fixed by triton 3.9 (``squeeze()``)."""
    from importlib.metadata import version

    def major_minor(name):
        return tuple(int(x) for x in version(name).split(".")[:2])

    return major_minor("triton") < (3, 9) and major_minor("numpy") >= (2, 5)


@needs_triton
@pytest.mark.parametrize("check", ["attention", "copy", "scores"])
def test_interpreter(check):
    """The Triton kernels themselves, on CPU under ``TRITON_INTERPRET=1`` (a few seconds each)."""
    if check == "attention" and _interpreter_loops_broken():
        pytest.skip("this triton's interpreter cannot run loops with runtime bounds under numpy >= 2.5 "
                    "(use triton >= 3.9, or numpy < 2.5)")
    _interpret(check)


# ----------------------------------------------------------------------------- references on CPU (no GPU)
def _naive_attention(args, scaling, softcap=None):
    q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v = args
    B, Hq, D = q.shape
    H = slots.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // H)
            ks, vs = [sink_k[b, h], win_k[b, h]], [sink_v[b, h], win_v[b, h]]
            for s in slots[b, h].tolist():
                if s >= 0:
                    n = int(slot_len[b, h, s])
                    ks.append(slot_k[b, h, s, :n])
                    vs.append(slot_v[b, h, s, :n])
            k, v = torch.cat(ks).double(), torch.cat(vs).double()
            logit = k @ q[b, hq].double() * scaling
            if softcap:
                logit = torch.tanh(logit / softcap) * softcap
            out[b, hq] = torch.softmax(logit, 0) @ v
    return out


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_reference_attention_matches_naive_loop(softcap):
    args = attention_inputs(2, 2, 3, 8, 3, 2, 10, 4, 6)
    torch.testing.assert_close(paged_decode_attention(*args, 0.3, softcap).double(), _naive_attention(args, 0.3, softcap),
                               atol=1e-5, rtol=1e-5)


def test_dispatch_env_var(monkeypatch):
    args = attention_inputs(1, 2, 4, 16, 3, 2, 10, 4, 6)
    q = args[0]
    ref = paged_decode_attention(*args, 0.25)
    for mode in (None, "", "auto", "torch", " Torch "):
        if mode is None:
            monkeypatch.delenv(attn.ATTENTION_ENV, raising=False)
        else:
            monkeypatch.setenv(attn.ATTENTION_ENV, mode)
        assert attention_backend(q) == "torch"  # CPU tensors: the reference
        assert torch.equal(decode_attention(*args, 0.25), ref)
    monkeypatch.setenv(attn.ATTENTION_ENV, "cuda")
    with pytest.raises(ValueError, match="KVPOLICY_ATTENTION must be"):
        decode_attention(*args, 0.25)
    monkeypatch.setenv(attn.ATTENTION_ENV, "triton")
    monkeypatch.setattr(attn, "_triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        decode_attention(*args, 0.25)
    monkeypatch.setattr(attn, "_triton_available", lambda: True)
    assert attention_backend(q) == "triton"
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="need CUDA tensors"):  # forced Triton on CPU tensors: a clear error
            decode_attention(*args, 0.25)
    monkeypatch.delenv(attn.ATTENTION_ENV)
    monkeypatch.setattr(attn, "_triton_available", lambda: False)
    assert attention_backend(q.to("meta")) == "torch"


def test_the_decode_step_calls_the_dispatcher():
    """The layer's decode step (``kvpolicy.step``) attends through the dispatcher, never the torch reference."""
    step, layer = ((ROOT / "kvpolicy" / name).read_text() for name in ("step.py", "layer.py"))
    assert "decode_attention(" in step and "paged_decode_attention(" not in step + layer


def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


def test_attention_input_errors():
    args = attention_inputs(1, 2, 4, 16, 3, 2, 10, 4, 6)
    q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v = args
    cases = [
        (0, q.numpy(), TypeError, "q must be a torch.Tensor"),
        (0, q[0], ValueError, r"q must have 3 dims \[B, Hq, D\]"),
        (0, q.half(), TypeError, "sink_k must have the dtype of q"),
        (0, q.long(), TypeError, "q must be float16, bfloat16 or float32"),
        (0, q[:, :7], ValueError, "Hq=7 must be a multiple of the KV heads Hkv=2"),
        (3, slot_k[..., :8], ValueError, "slot_k must have shape"),
        (4, slot_v[:, :, :3], ValueError, "slot_v must have shape"),
        (5, slot_len.float(), TypeError, "slot_len must be int32 or int64"),
        (5, slot_len[:, :, :4], ValueError, r"slot_len must have shape \[B, Hkv, N\]"),
        (6, slots.float(), TypeError, "slots must be int32 or int64"),
        (6, slots[0], ValueError, r"slots must have 3 dims \[B, Hkv, K\]"),
        (1, sink_k[..., :3, :8], ValueError, "sink_k must have shape"),
        (8, win_v[:, :, :1], ValueError, "win_v must have shape"),
        (7, win_k.to("meta"), ValueError, "win_k is on meta but q is on cpu"),
    ]
    for i, value, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            check_paged_attention_inputs(*_bad(args, i, value))
    with pytest.raises(ValueError, match="softcap must be positive"):
        check_paged_attention_inputs(*args, softcap=-1.0)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors, q is on cpu"):
            check_paged_attention_inputs(*args)
    big = attention_inputs(1, 1, 1, 512, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="head dim D=512"):
        check_paged_attention_inputs(*big)


@needs_triton
def test_copy_and_score_references_match_naive_loops():
    from kvpolicy_kernels.page_copy import gather_pages_ref, scatter_pages_ref
    from kvpolicy_kernels.page_scores import exact_page_scores_ref, quest_page_scores_ref

    from kvpolicy.ops import topk_pages

    g = torch.Generator().manual_seed(3)
    B, H, C, S, D, K = 2, 3, 9, 4, 5, 6
    pool = torch.randn(B, H, C, S, D, generator=g)
    ids = torch.randint(-1, C, (B, H, K), generator=g)
    got = gather_pages_ref(pool, ids)
    for b in range(B):
        for h in range(H):
            for k in range(K):
                want = pool[b, h, ids[b, h, k]] if ids[b, h, k] >= 0 else torch.zeros(S, D)
                assert torch.equal(got[b, h, k], want)
    slots = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B * H)]).view(B, H, K)
    slots[1, 2, :2] = -1
    src = torch.randn(B, H, K, S, D, generator=g)
    want = pool.clone()
    for b in range(B):
        for h in range(H):
            for k in range(K):
                if slots[b, h, k] >= 0:
                    want[b, h, slots[b, h, k]] = src[b, h, k]
    assert torch.equal(scatter_pages_ref(pool.clone(), slots, src), want)
    strided = pool.clone().transpose(0, 1).contiguous().transpose(0, 1)  # index_put path
    assert torch.equal(scatter_pages_ref(strided, slots, src), want)

    G = 2
    q = torch.randn(B, H * G, D, generator=g)
    lens = torch.randint(0, S + 1, (B, H, C), generator=g)
    lo = torch.randn(B, H, C, D, generator=g)
    hi = lo + torch.rand(B, H, C, D, generator=g)
    num = torch.tensor([[C, 2, 0], [5, 5, C]])
    ex, qu = exact_page_scores_ref(q, pool, lens), quest_page_scores_ref(q, lo, hi, num)
    for b in range(B):
        for hq in range(H * G):
            h = hq // G
            for c in range(C):
                n = int(lens[b, h, c])
                want = (pool[b, h, c, :n] @ q[b, hq]).max() if n else torch.tensor(float("-inf"))
                torch.testing.assert_close(ex[b, hq, c], want)
                box = torch.maximum(q[b, hq] * lo[b, h, c], q[b, hq] * hi[b, h, c]).sum()
                torch.testing.assert_close(qu[b, hq, c], box if c < num[b, h] else torch.tensor(float("-inf")))
    ids = topk_pages(ex, 4, H)
    assert ids.shape == (B, H, 4)
    assert torch.equal(ids, gqa_merge(ex.topk(4, -1).indices.masked_fill(ex.topk(4, -1).values.isneginf(), -1)
                                      .view(B, H, G, 4), 4))


@needs_triton
def test_copy_and_score_input_errors():
    from kvpolicy_kernels.page_copy import gather_pages, scatter_pages
    from kvpolicy_kernels.page_scores import exact_page_scores, quest_page_scores

    pool = torch.zeros(1, 2, 4, 16, 8)
    ids = torch.zeros(1, 2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"pool must have 5 dims \[B, H, N, S, D\]"):
        gather_pages(pool[0], ids)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        gather_pages(pool, ids.float())
    with pytest.raises(ValueError, match=r"ids must have shape \[B, H, K\]"):
        gather_pages(pool, ids[:, :1])
    with pytest.raises(TypeError, match="src must have dst's dtype"):
        scatter_pages(pool, ids, torch.zeros(1, 2, 3, 16, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"src must have shape"):
        scatter_pages(pool, ids, torch.zeros(1, 2, 3, 16, 4))
    q = torch.zeros(1, 6, 8)
    with pytest.raises(ValueError, match="Hq=6 must be a multiple of the KV heads Hkv=4"):
        exact_page_scores(q, torch.zeros(1, 4, 4, 16, 8), torch.zeros(1, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="pool_k must have the dtype of q"):
        exact_page_scores(q, pool.half(), torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"num_pages must have shape \[B, Hkv\]"):
        quest_page_scores(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(2, 2, dtype=torch.int64))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="need CUDA tensors"):
            gather_pages(pool, ids)
