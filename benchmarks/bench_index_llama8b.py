"""IceCache's index at Llama-3.1-8B shapes: build of the whole prompt and search of every sparse layer per step.

    python benchmarks/bench_index_llama8b.py --device cuda --length 36864 --json out.jsonl

The targets it checks (36k tokens, 32 layers of which 30 sparse, 8 KV heads, 32 query heads, D = 128): index search
for all sparse layers <= 5 ms per decode step; build <= 1 s for the whole prompt. One index per layer, as in a
decode step: the step's searches are issued layer after layer and the clock stops once, after the last one.
Keys are clustered bf16 keys (``kvpolicy.testing.clustered_keys``-like, generated on the device); queries are keys
at random positions plus noise, as in ``bench_dci_tree.py``. Latency only: these are not model keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvpolicy.reference.exact_index import ExactIndex
from kvpolicy_icecache.dci_tree_index import DCITreeIndex


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def clustered(H: int, T: int, D: int, seed: int, dev: str, dtype) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    C = max(16, T // 512)
    centres = torch.randn(H, C, D, generator=g, device=dev) * 2.0
    assign = torch.randint(0, C, (H, T), generator=g, device=dev)
    keys = centres.gather(1, assign[..., None].expand(H, T, D)) + 0.5 * torch.randn(H, T, D, generator=g, device=dev)
    keys[:, ::97] *= 3.0
    return keys[None].to(dtype)  # [1, H, T, D]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=36864)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dense-layers", type=int, default=2, help="IceCache keeps the first two layers dense")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=12, help="retrieved pages (256-token budget: 2 + 2 + 12 pages)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--indexes", default="exact,dci_tree,dci_tree_beam")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, H, G, D, T = args.device, args.kv_heads, args.gqa, args.dim, args.length
    L = args.layers - args.dense_layers
    dtype = torch.bfloat16
    makers = {
        "exact": lambda: ExactIndex(device=dev),
        "dci_tree": lambda: DCITreeIndex(device=dev),  # masked search on CUDA
        "dci_tree_beam": lambda: DCITreeIndex(device=dev, search_mode="beam"),
    }
    keys = [clustered(H, T + 16, D, seed=i, dev=dev, dtype=dtype) for i in range(L)]
    g = torch.Generator(device=dev).manual_seed(123)
    queries = []  # [step][layer] -> [1, H*G, D]
    for _ in range(args.steps + 2):
        row = []
        for lk in keys:
            at = torch.randint(0, T, (H, G), generator=g, device=dev)
            q = lk[0, torch.arange(H, device=dev)[:, None], at].reshape(1, H * G, D).float()
            row.append((q + 0.5 * torch.randn(q.shape, generator=g, device=dev)).to(dtype))
        queries.append(row)
    print(f"device={dev} T={T} sparse layers={L} Hkv={H} Hq={H * G} D={D} k={args.k} keys={dtype}")
    print(f"{'index':<14} {'build all (s)':>13} {'build/layer ms':>14} {'search step ms':>14} {'p90 ms':>8} "
          f"{'add step ms':>11}")
    for name in args.indexes.split(","):
        warm = makers[name]()
        warm.build(keys[0][:, :, :2048], page_size=16)
        warm.search(queries[0][0], args.k)
        sync(dev)
        idxs = [makers[name]() for _ in range(L)]
        sync(dev)
        t0 = time.perf_counter()
        for idx, lk in zip(idxs, keys):
            idx.build(lk[:, :, :T], page_size=16)
        sync(dev)
        build = time.perf_counter() - t0
        for idx, q in zip(idxs, queries[0]):  # warm-up step
            idx.search(q, args.k)
        steps = []
        for s in range(1, args.steps + 1):
            sync(dev)
            t0 = time.perf_counter()
            for idx, q in zip(idxs, queries[s]):
                idx.search(q, args.k)
            sync(dev)
            steps.append(time.perf_counter() - t0)
        sync(dev)
        t0 = time.perf_counter()
        for idx, lk in zip(idxs, keys):  # one page inserted into every sparse layer (one insertion step)
            idx.add(lk[:, :, T:])
        sync(dev)
        add = time.perf_counter() - t0
        med, p90 = statistics.median(steps), sorted(steps)[int(0.9 * (len(steps) - 1))]
        print(f"{name:<14} {build:13.3f} {build / L * 1e3:14.1f} {med * 1e3:14.2f} {p90 * 1e3:8.2f} {add * 1e3:11.1f}",
              flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "index_targets", "device": dev, "index": name, "T": T, "sparse_layers": L,
                                    "kv_heads": H, "q_heads": H * G, "dim": D, "k": args.k, "build_all_s": build,
                                    "search_step_ms": med * 1e3, "search_step_p90_ms": p90 * 1e3,
                                    "add_step_ms": add * 1e3}) + "\n")
        del idxs
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
