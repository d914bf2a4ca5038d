"""Triton kernels vs their torch references vs dense SDPA, at the Llama-3.1-8B layer shape (one decode step).

Shape: batch 1, Hq = 32, Hkv = 8, D = 128, bf16, pages of S = 16 tokens. Three numbers per case:

* ``µs``: median over ``--reps`` (>= 50) calls, each bracketed by CUDA events after the L2 cache was flushed
  (a 256 MB write outside the timed region), so the KV bytes come from HBM as in a real decode step; it
  includes any Python / launch overhead that the GPU had to wait for;
* ``GPU µs``: the same call captured once in a CUDA graph and replayed (same median, same flush): device
  time alone, what a graph-captured decode step would pay (``-`` where the call cannot be captured);
* ``CPU µs``: host time to issue one call (200 calls back to back, no synchronisation in between).

GB/s are computed from ``GPU µs`` (or ``µs`` where there is none).

* paged attention at budgets of 256 / 1024 / 4096 tokens (2 sink + 2 window pages + the rest selected
  pages, ragged page lengths off): Triton split-K kernel, torch reference, and SDPA over the same number of
  contiguous tokens (``enable_gqa``);
* dense SDPA decode over 8k / 32k / 128k-token contexts, for scale;
* page gather / scatter (K pages per KV head from / to a pool of C = 8192 pages): GB/s counting bytes read
  and written;
* page scoring over C = 8192 pages (exact max q.k over the keys, Quest box bound), and top-k on the GPU.

    python benchmarks/bench_kernels.py --json results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

B, HQ, HKV, D, S = 1, 32, 8, 128, 16
SINK_PAGES = WINDOW_PAGES = 2
_GEN: torch.Generator | None = None  # inputs come from their own generator: graph captures (SDPA) register the
# default CUDA generator, which then refuses draws outside a capture


def _randn(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=_GEN)


def _randperm(n: int, k: int) -> torch.Tensor:
    return torch.randperm(n, device="cuda", generator=_GEN)[:k]


class Timer:
    """Median of per-launch CUDA-event times (µs), L2 flushed before each launch."""

    def __init__(self, reps: int, warmup: int = 10) -> None:
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def measure(self, fn) -> dict:
        """{"us": events per call, "gpu_us": CUDA-graph replay (None if fn cannot be captured), "cpu_us"}."""
        us = self(fn)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        cpu_us = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        gpu_us = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            gpu_us = self(graph.replay)
        except Exception:  # host syncs (boolean indexing) cannot be captured
            torch.cuda.synchronize()
        return {"us": us, "gpu_us": gpu_us, "cpu_us": cpu_us}


def _row(t: dict, nbytes: int, **info) -> dict:
    row = {**info, **t, "GBps": nbytes / (t["gpu_us"] or t["us"]) / 1e3}
    gpu = "-" if t["gpu_us"] is None else f"{t['gpu_us']:.1f}"
    print(f"  {info['bench']:12} {info['impl']:28} {info['tokens']:>7} tokens  {t['us']:8.1f} us  GPU {gpu:>7} us  "
          f"CPU {t['cpu_us']:6.1f} us", flush=True)
    return row


def bench_attention(timer: Timer, budgets: list[int], contexts: list[int]) -> list[dict]:
    from kvpolicy_kernels.paged_attention import paged_decode_attention_triton

    from kvpolicy.attention import paged_decode_attention as paged_decode_attention_ref

    dev = "cuda"
    rows = []
    scaling = D**-0.5
    q = _randn(B, HQ, D)
    for budget in budgets:
        K = budget // S - SINK_PAGES - WINDOW_PAGES
        N = 2 * K  # a working set twice the selection, slots chosen at random
        sink_k, sink_v = (_randn(B, HKV, SINK_PAGES * S, D) for _ in range(2))
        win_k, win_v = (_randn(B, HKV, WINDOW_PAGES * S, D) for _ in range(2))
        slot_k, slot_v = (_randn(B, HKV, N, S, D) for _ in range(2))
        slot_len = torch.full((B, HKV, N), S, dtype=torch.int32, device=dev)
        slots = torch.stack([_randperm(N, K) for _ in range(HKV)]).unsqueeze(0)
        args = (q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v, scaling)
        err = (paged_decode_attention_triton(*args).float() - paged_decode_attention_ref(*args).float()).abs().max()
        kv = _randn(2, B, HKV, budget, D)
        qs = q.view(B, HQ, 1, D)
        sdpa = lambda kv=kv, qs=qs: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qs, kv[0], kv[1], scale=scaling, enable_gqa=True)
        nbytes = 2 * B * HKV * budget * D * 2
        for impl, fn in (
            ("triton paged", lambda args=args: paged_decode_attention_triton(*args)),
            ("torch paged (reference)", lambda args=args: paged_decode_attention_ref(*args)),
            ("SDPA dense, same tokens", sdpa),
        ):
            rows.append(_row(timer.measure(fn), nbytes, bench="attention", impl=impl, tokens=budget, pages=budget // S,
                             max_abs_err_vs_ref=float(err) if impl.startswith("triton") else None))
    for T in contexts:
        kv = _randn(2, B, HKV, T, D)
        qs = q.view(B, HQ, 1, D)
        t = timer.measure(lambda kv=kv, qs=qs: torch.nn.functional.scaled_dot_product_attention(
            qs, kv[0], kv[1], scale=scaling, enable_gqa=True))
        rows.append(_row(t, 2 * B * HKV * T * D * 2, bench="attention", impl="SDPA dense context", tokens=T,
                         pages=T // S))
        del kv
    return rows


def bench_copy(timer: Timer, C: int, ks: list[int]) -> list[dict]:
    from kvpolicy_kernels.page_copy import gather_pages, gather_pages_ref, scatter_pages, scatter_pages_ref

    pool = _randn(B, HKV, C, S, D)
    rows = []
    for K in ks:
        ids = torch.stack([_randperm(C, K) for _ in range(HKV)]).unsqueeze(0)
        src = _randn(B, HKV, K, S, D)
        out = torch.empty_like(src)
        nbytes = 2 * src.numel() * src.element_size()  # read + write
        assert torch.equal(gather_pages(pool, ids), gather_pages_ref(pool, ids))
        for impl, fn in (
            ("triton gather", lambda ids=ids, out=out: gather_pages(pool, ids, out=out)),
            ("torch gather (reference)", lambda ids=ids: gather_pages_ref(pool, ids)),
            ("triton scatter", lambda ids=ids, src=src: scatter_pages(pool, ids, src)),
            ("torch scatter (reference)", lambda ids=ids, src=src: scatter_pages_ref(pool, ids, src)),
        ):
            rows.append(_row(timer.measure(fn), nbytes, bench="page copy", impl=impl, pages=K, tokens=K * S))
    return rows


def bench_scores(timer: Timer, C: int, k: int) -> list[dict]:
    from kvpolicy_kernels.page_scores import (
        exact_page_scores,
        exact_page_scores_ref,
        quest_page_scores,
        quest_page_scores_ref,
    )

    from kvpolicy.ops import topk_pages

    dev = "cuda"
    q = _randn(B, HQ, D)
    pool = _randn(B, HKV, C, S, D)
    lens = torch.full((B, HKV, C), S, dtype=torch.int32, device=dev)
    lo = _randn(B, HKV, C, D, dtype=torch.float32)
    hi = lo + _randn(B, HKV, C, D, dtype=torch.float32).abs()
    num = torch.full((B, HKV), C, dtype=torch.int64, device=dev)
    scores = quest_page_scores(q, lo, hi, num)
    rows = []
    for impl, fn, nbytes in (
        ("triton exact", lambda: exact_page_scores(q, pool, lens), pool.numel() * 2),
        ("torch exact (reference)", lambda: exact_page_scores_ref(q, pool, lens), pool.numel() * 2),
        ("triton quest", lambda: quest_page_scores(q, lo, hi, num), 2 * lo.numel() * 4),
        ("torch quest (reference)", lambda: quest_page_scores_ref(q, lo, hi, num), 2 * lo.numel() * 4),
        (f"top-{k} + GQA merge (torch)", lambda: topk_pages(scores, k, HKV), scores.numel() * 4),
    ):
        rows.append(_row(timer.measure(fn), nbytes, bench="page scores", impl=impl, pages=C, tokens=C * S))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--reps", type=int, default=100, help="timed launches per case (>= 50)")
    ap.add_argument("--budgets", default="256,1024,4096", help="paged-attention budgets in tokens")
    ap.add_argument("--contexts", default="8192,32768,131072", help="dense SDPA contexts in tokens")
    ap.add_argument("--pages", type=int, default=8192, help="pool pages C for copy and scoring")
    args = ap.parse_args()
    if args.reps < 50:
        ap.error("--reps must be >= 50")
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; these are GPU kernel benchmarks, nothing was run.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed (pip install 'triton>=3.0'); nothing was run.")
        return 0
    from rich.console import Console
    from rich.table import Table

    global _GEN
    _GEN = torch.Generator(device="cuda")
    _GEN.manual_seed(0)
    timer = Timer(args.reps)
    budgets = [int(x) for x in args.budgets.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    rows = bench_attention(timer, budgets, contexts)
    rows += bench_copy(timer, args.pages, [12, 60, 252])
    rows += bench_scores(timer, args.pages, 252)
    table = Table(title=f"kernels on {torch.cuda.get_device_name()} (B={B}, Hq={HQ}, Hkv={HKV}, D={D}, S={S}, bf16; "
                        f"median of {args.reps}, L2 flushed)")
    for col in ("bench", "impl", "tokens", "pages", "µs", "GPU µs", "CPU µs", "GB/s"):
        table.add_column(col, justify="left" if col in ("bench", "impl") else "right")
    for r in rows:
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        table.add_row(r["bench"], r["impl"], str(r["tokens"]), str(r["pages"]), f"{r['us']:.1f}", gpu,
                      f"{r['cpu_us']:.1f}", f"{r['GBps']:.0f}")
    Console().print(table)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "S": S, "dtype": "bfloat16"}, "reps": args.reps,
                "timing": "us: median CUDA-event time per call, L2 flushed before each; gpu_us: the same for a "
                          "CUDA-graph replay of the call; cpu_us: host time per call; GBps from gpu_us"}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
