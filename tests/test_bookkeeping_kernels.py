"""Bookkeeping kernels of the decode path against their torch definitions: kvpolicy_kernels.lru_reserve (the one-launch
LRU reservation, against the torch ``lru`` allocator) and kvpolicy_kernels.gqa_merge (against ``ops.gqa_merge_reference``).

Both allocators run the same random sequence of reserve / release / invalidate calls (hits, misses, evictions,
pinned slots, PAD entries, unsorted selections) and must return the same reservations and hold the same tables
after every call. On CPU the kernel runs in the Triton interpreter (a subprocess, so that ``TRITON_INTERPRET=1``
is set before triton is imported); the ``cuda`` test runs it on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpolicy.reference.lru_allocator import LRUAllocator
from kvpolicy.types import Selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sequence(device: str, *, B=2, H=3, N=6, P=40, K=5, steps=40, seed=0) -> None:
    """Drive a kernel allocator and a torch allocator through the same calls; assert they agree throughout."""
    g = torch.Generator().manual_seed(seed)
    fast, ref = LRUAllocator(kernel=True, check=False), LRUAllocator(kernel=False, check=False)
    for a in (fast, ref):
        a.setup(B, H, N, device)
        a.ensure_pages(P)
    held: list = []  # reservations not yet released (pinned slots), per allocator
    for step in range(steps):
        span = P // 3 if step % 3 else P  # mostly a small page range, so that pages come back (hits) and evict
        k = min(int(torch.randint(1, K + 1, (1,), generator=g)), span)
        # distinct pages per row, some PAD
        ids = torch.stack([torch.randperm(span, generator=g)[:k] for _ in range(B * H)])
        ids = torch.where(torch.rand(B * H, k, generator=g) < 0.2, -1, ids).view(B, H, k)
        while held and len(held) * K + k > N:  # keep enough evictable slots: release the oldest reservations
            rf, rr = held.pop(0)
            fast.release(rf)
            ref.release(rr)
        rf = fast.reserve(Selection(page_ids=ids.to(device)))
        rr = ref.reserve(Selection(page_ids=ids.to(device)))
        for f in ("page_ids", "slots", "missing", "evicted"):
            assert torch.equal(getattr(rf, f).cpu(), getattr(rr, f).cpu()), (step, f, getattr(rf, f), getattr(rr, f))
        if step % 2:  # sometimes keep it pinned for a while
            held.append((rf, rr))
        else:
            fast.release(rf)
            ref.release(rr)
        if step % 7 == 6:  # pages rewritten by an insertion lose their slot
            inv = torch.randint(0, P, (B, H, 2), generator=g).to(device)
            fast.invalidate(inv)
            ref.invalidate(inv)
        for t in ("_slot_page", "_last_used", "_pins", "_page_slot"):
            assert torch.equal(getattr(fast, t).cpu(), getattr(ref, t).cpu()), (step, t)
    assert bool((ref._pins[..., :N] >= 0).all())


_INTERP = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    from test_bookkeeping_kernels import run_sequence
    for seed, shape in enumerate([dict(), dict(B=1, H=1, N=1, P=5, K=1), dict(B=1, H=2, N=17, P=64, K=9),
                                  dict(B=2, H=1, N=12, P=30, K=12, steps=25)]):
        run_sequence("cpu", seed=seed, **shape)
    print("ok")
    """
)


def run_interpreted(code: str) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1``; it must print ``ok`` last."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_lru_kernel_matches_the_torch_allocator_in_the_triton_interpreter():
    run_interpreted(_INTERP)


def test_kernel_choice_defaults():
    a = LRUAllocator()
    a.setup(1, 2, 4, "cpu")
    assert not a._use_kernel(4)  # CPU tables: torch path (and checks on)
    assert LRUAllocator(kernel=False)._use_kernel(4) is False


def test_kernel_launcher_rejects_bad_tables():
    pytest.importorskip("triton", reason="triton is not installed")
    from kvpolicy_kernels.lru_reserve import MAX_SLOTS, lru_reserve

    sp = torch.full((1, 1, MAX_SLOTS + 2), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match="at most"):
        lru_reserve(sp, torch.zeros_like(sp), torch.zeros_like(sp, dtype=torch.int32),
                    torch.full((1, 1, 9), -1, dtype=torch.int64), torch.zeros((1, 1, 2), dtype=torch.int64),
                    torch.ones(1, dtype=torch.int64))
    sp = torch.full((1, 1, 5), -1, dtype=torch.int64)
    with pytest.raises(TypeError, match="pins"):
        lru_reserve(sp, torch.zeros_like(sp), torch.zeros_like(sp), torch.full((1, 1, 9), -1, dtype=torch.int64),
                    torch.zeros((1, 1, 2), dtype=torch.int64), torch.ones(1, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [dict(), dict(B=1, H=8, N=12, P=600, K=12, steps=60), dict(B=2, H=2, N=200, P=900,
                                                                                           K=64, steps=30)])
def test_lru_kernel_matches_the_torch_allocator_on_cuda(shape):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_sequence("cuda", **shape)


# ------------------------------------------------------------------------------------------------ gqa_merge
def merge_cases(device: str):
    """(ranked, k) pairs: duplicates across and within heads, PAD holes, k below/above the distinct count."""
    g = torch.Generator().manual_seed(3)
    for B, H, G, R, span, k in [(1, 2, 4, 12, 30, 12), (2, 3, 1, 5, 8, 5), (1, 1, 7, 9, 10, 40), (2, 8, 4, 28, 200, 28),
                                (1, 2, 6, 12, 5, 12), (1, 1, 3, 4, 100, 0)]:
        r = torch.randint(0, span, (B, H, G, R), generator=g)
        r = torch.where(torch.rand(B, H, G, R, generator=g) < 0.15, -1, r)
        yield r.to(device), k


_MERGE_INTERP = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, "tests")
    from test_bookkeeping_kernels import merge_cases
    from kvpolicy_kernels.gqa_merge import gqa_merge_triton
    from kvpolicy.ops import gqa_merge_reference
    for ranked, k in merge_cases("cpu"):
        a, b = gqa_merge_triton(ranked, k), gqa_merge_reference(ranked, k)
        assert a.shape == b.shape and torch.equal(a, b), (ranked.shape, k, a, b)
    print("ok")
    """
)


def test_gqa_merge_kernel_matches_the_reference_in_the_triton_interpreter():
    run_interpreted(_MERGE_INTERP)


@pytest.mark.cuda
def test_gqa_merge_kernel_matches_the_reference_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvpolicy_kernels.gqa_merge import gqa_merge_triton

    from kvpolicy.ops import gqa_merge, gqa_merge_reference

    for ranked, k in merge_cases("cuda"):
        ref = gqa_merge_reference(ranked, k)
        assert torch.equal(gqa_merge_triton(ranked, k), ref) and torch.equal(gqa_merge(ranked, k), ref)
