"""Page transfer: ``sync`` vs ``bulk_load`` moving K pages per (layer, step) from pinned CPU pages to GPU slots.

Shapes: Llama-3.1-8B layer (8 KV heads, D = 128, bf16, S = 16), a 128k-token CPU pool, K missing pages per
head. Prints µs per (submit + wait) and achieved GB/s, side by side, and writes JSON if --json is given.
``--cpu-pool-dtype fp8`` moves an fp8 pool's pages (half the bytes, dequantised on the GPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpolicy.pool import PagePool
from kvpolicy.registry import get_registry


def source_pool(heads=8, D=128, tokens=131072, S=16, pool_dtype="auto") -> PagePool:
    """One pinned CPU pool (in chunks) shared by every run, random pages (fp8: scale 1/64)."""
    src = PagePool(1, heads, S, D, dtype=torch.bfloat16, capacity=tokens // S, pool_dtype=pool_dtype)
    for c in src.k_chunks + src.v_chunks:
        c.copy_(torch.randn(c.shape).to(c.dtype))
    if src.fp8:
        src.k_scale.fill_(1 / 64)
        src.v_scale.fill_(1 / 64)
    src.lengths.fill_(S)
    return src


def bench(name: str, pages: int, src: PagePool, reps=50) -> dict:
    dev = "cuda"
    heads, S, D, tokens = src.num_kv_heads, src.page_size, src.head_dim, src.capacity * src.page_size
    dst = PagePool(1, heads, S, D, dtype=torch.bfloat16, device=dev, capacity=pages, pin=False, track_tokens=False)
    t = get_registry().get("transfer", name)()
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(tokens // S, generator=g)[:pages] for _ in range(heads)]).unsqueeze(0)
    slots = torch.arange(pages).expand(1, heads, pages).clone()
    for _ in range(5):
        t.wait(t.submit(src, ids, dst, slots))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        t.wait(t.submit(src, ids, dst, slots))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    nbytes = heads * pages * src.page_nbytes()  # as stored (fp8: with the scales)
    ok = torch.equal(dst.k[0, 3, 5].cpu(), src.read_pages(torch.tensor([3]), ids[0, 3, 5:6])[0][0])
    return {"transfer": name, "pool_dtype": src.pool_dtype, "pages_per_head": pages, "us": dt * 1e6,
            "GBps": nbytes / dt / 1e9, "bytes": nbytes, "bit_exact": bool(ok)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--tokens", type=int, default=131072, help="tokens in the CPU pool of the layer")
    ap.add_argument("--transfers", default="bulk_load,sync")
    ap.add_argument("--cpu-pool-dtype", default="auto", choices=["auto", "fp8"], help="how the CPU pool stores K/V")
    args = ap.parse_args()
    src = source_pool(tokens=args.tokens, pool_dtype=args.cpu_pool_dtype)
    rows = [bench(n, k, src) for k in (12, 60, 252) for n in args.transfers.split(",")]
    print(f"{'transfer':10} {'pages/head':>10} {'us/step':>10} {'GB/s':>8} {'exact':>6}")
    for r in rows:
        print(f"{r['transfer']:10} {r['pages_per_head']:>10} {r['us']:>10.1f} {r['GBps']:>8.2f} {r['bit_exact']!s:>6}")
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
