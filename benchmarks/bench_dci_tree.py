"""DCI-tree index vs the exact positional index: build, add and search time, and page recall@k.

    python benchmarks/bench_dci_tree.py                     # CPU, T = 8k and 32k, 1 thread
    python benchmarks/bench_dci_tree.py --device cuda --lengths 8192 32768 131072

Keys are clustered with large-norm outliers (``kvpolicy.testing.clustered_keys``), one layer of Hkv KV heads; the
queries are keys at random positions plus noise (or random, ``--queries random``), Hq = gqa * Hkv query heads. Recall@k is page recall of the DCI
search against the exact top-k over the DCI index's *own* pages (best token's q.k per page, GQA merge as in
``kvpolicy.ops.gqa_merge``): it measures the search, not the paging. Timings are wall-clock medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvpolicy.ops import gqa_merge, page_max_scores, topk_ids
from kvpolicy.reference.exact_index import ExactIndex
from kvpolicy.testing import clustered_keys, page_recall
from kvpolicy.types import SearchParams, Selection
from kvpolicy_icecache.dci_tree_index import DCITreeIndex


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn, *args, **kwargs):
    _sync(device)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t


def exact_selection(idx: DCITreeIndex, keys: torch.Tensor, q: torch.Tensor, k: int) -> Selection:
    """Exact top-k of idx's own pages: keys [B, H, T, D], q [B, Hq, D]."""
    B, H, T, D = keys.shape
    G = q.shape[1] // H
    tp = idx.token_pages().to(keys.device)  # [B, H, T]
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(B, H, G, D).float(), keys.float())
    ps = page_max_scores(s.reshape(B, H * G, T), tp[:, :, None].expand(B, H, G, T).reshape(B, H * G, T),
                         int(idx.num_pages.max()))
    ids, _ = topk_ids(ps, k)
    return Selection(page_ids=gqa_merge(ids.view(B, H, G, -1), k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=12, help="retrieved pages per KV head (IceCache: 12)")
    ap.add_argument("--steps", type=int, default=10, help="search calls timed")
    ap.add_argument("--adds", type=int, default=8, help="pages added one at a time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.5, help="query = key at a random position + noise * N(0, 1)")
    ap.add_argument("--queries", choices=["near", "random"], default="near",
                    help="near: keys plus noise; random: N(0, 1) queries, not close to any key")
    ap.add_argument("--json", default=None, help="append one JSON object per (T, index) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev, H, G, D, S, k = args.device, args.kv_heads, args.gqa, args.dim, args.page_size, args.k
    print(f"device={dev} threads={torch.get_num_threads()} Hkv={H} Hq={H * G} D={D} S={S} k={k}")
    hdr = f"{'T':>7} {'index':<18} {'build us/tok':>12} {'add ms/page':>11} {'search ms':>10} {'recall@k':>8}  notes"
    print(hdr)
    for T in args.lengths:
        total = T + args.adds * S
        keys = clustered_keys(B=1, H=H, T=total, D=D, clusters=max(16, T // 512), seed=0).to(dev)
        g = torch.Generator().manual_seed(1)
        qs = []
        for _ in range(args.steps):
            at = torch.randint(0, T, (H, G), generator=g)
            q = keys[0, torch.arange(H)[:, None], at.to(dev)].reshape(1, H * G, D)
            noise = torch.randn(q.shape, generator=g).to(dev)
            qs.append(q + args.noise * noise if args.queries == "near" else 3.0 * noise)
        for name, make, params in (
            ("exact", lambda: ExactIndex(device=dev), None),
            ("dci_tree", lambda: DCITreeIndex(device=dev), None),  # masked search (default)
            ("dci_tree beam", lambda: DCITreeIndex(device=dev, search_mode="beam"), None),
            ("dci_tree pr=0.8", lambda: DCITreeIndex(device=dev), SearchParams(prop_to_retrieve=0.8)),
        ):
            idx = make()
            idx.build(keys[:, :, :1024], page_size=S)  # warm-up (CUDA context, allocator)
            _, tb = _timed(dev, idx.build, keys[:, :, :T], page_size=S)
            ta = []
            for i in range(args.adds):
                _, t = _timed(dev, idx.add, keys[:, :, T + i * S : T + (i + 1) * S])
                ta.append(t)
            idx.search(qs[0], k, params=params)  # warm-up
            ts, rec, scanned = [], [], []
            for q in qs:
                sel, t = _timed(dev, idx.search, q, k, params=params)
                ts.append(t)
                if isinstance(idx, DCITreeIndex):
                    rec.append(page_recall(sel, exact_selection(idx, keys, q, k)))
                    scanned.append(idx.last_scanned_fraction)
            notes = ""
            if isinstance(idx, DCITreeIndex):
                notes = (f"scanned {100 * statistics.mean(scanned):.0f}% of tokens; levels={idx.level_sizes}; "
                         f"pages/head={int(idx.num_pages.float().mean())}")
            r = f"{statistics.mean(rec):8.3f}" if rec else f"{'1 (def)':>8}"
            print(f"{T:>7} {name:<18} {tb / T * 1e6:12.2f} {statistics.median(ta) * 1e3:11.2f} "
                  f"{statistics.median(ts) * 1e3:10.2f} {r}  {notes}", flush=True)
            if args.json:
                row = {"device": dev, "threads": torch.get_num_threads(), "T": T, "index": name, "kv_heads": H,
                       "q_heads": H * G, "dim": D, "k": k, "build_s": tb, "build_us_per_token": tb / T * 1e6,
                       "add_ms_per_page": statistics.median(ta) * 1e3, "search_ms": statistics.median(ts) * 1e3,
                       "recall_at_k": statistics.mean(rec) if rec else 1.0,
                       "scanned_fraction": statistics.mean(scanned) if scanned else 1.0}
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
