"""Every registered index on the CPU: build, search and add time, page recall@k against exact search, bytes.

    python benchmarks/bench_indexes.py                       # T = 8192, Hkv = 8, D = 128, 1 thread
    python benchmarks/bench_indexes.py --out benchmarks/results/indexes/indexes_cpu.txt

One layer of keys with cluster structure and large-norm outliers (``kvpolicy.testing.clustered_keys``, T // 512
clusters), B = 1, Hkv KV heads, Hq = gqa * Hkv query heads; queries are keys at random positions plus 0.5 N(0, 1).
Each index is built with its defaults (``cls()``). Columns:

* build ms: ``build(keys[:T])`` wall time.
* search us: one ``search(q, k)`` call, i.e. one decode step of one layer (all Hq query heads), median.
* add us/page: one ``add`` of S tokens per (b, KV head) (one page each), median over ``--adds`` calls.
* recall@k: page recall of the search against the exact top-k over the index's *own* pages (best token's
  ``q . k`` per page, GQA merge; ``kvpolicy.testing.exact_page_selection``), mean over the queries: it measures
  the search, not the paging. ``exact`` is 1 by definition.
* B/token: ``nbytes / (B * Hkv * T)`` after the build (index memory per key of one KV head; a float32 key of
  D = 128 is 512 bytes).
* pages/head: pages per (b, KV head) after the build (semantic indexes cut lists/cells into more than T/S pages).

``--sweep`` runs the parameter comparisons of docs/indexes.md instead (faiss_ivf nprobe and ranking by
centroid score alone, faiss_pq with D/4 sub-quantizers, HNSW oversampling).

Wall-clock, ``--threads`` torch and library threads (default 1: the decode path searches one layer at a time).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kvpolicy.ops import gqa_merge
from kvpolicy.registry import get_registry
from kvpolicy.testing import clustered_keys, exact_page_selection, page_recall
from kvpolicy.types import SearchParams, Selection


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _versions() -> str:
    out = [f"torch {torch.__version__}"]
    for dist in ("faiss-cpu", "hnswlib"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} missing")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "?"
    return ", ".join(out) + f", git {sha or '?'}"


def _make(cls, threads: int, kwargs: dict):
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**kwargs, num_threads=threads) if "num_threads" in fields else cls(**kwargs)


def _centroid_rank_search(idx):
    """faiss_ivf ranked by centroid score alone: each head's pages in the order of their list's ``q . c``
    (no list scan), GQA heads merged as usual; the alternative that docs/indexes.md measures."""
    def search(q, k, params=None):
        qn = idx._queries(q)  # [BH, G, D]
        B, H = idx.num_pages.shape
        kk = min(k, int(idx.num_pages.max()))
        order = idx._top_up(qn)[..., :kk]  # [BH, G, kk] pages by centroid score
        return Selection(page_ids=gqa_merge(order.reshape(B, H, -1, kk), kk))

    return search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=12, help="retrieved pages per KV head (IceCache: 12)")
    ap.add_argument("--queries", type=int, default=20, help="search calls timed (and recall averaged over)")
    ap.add_argument("--adds", type=int, default=8, help="pages added one at a time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--indexes", nargs="*", default=None, help="registered names (default: all)")
    ap.add_argument("--sweep", action="store_true",
                    help="instead of every index: faiss_ivf nprobe / centroid ranking, faiss_pq m, HNSW oversample")
    ap.add_argument("--out", default=None, help="also write the printed table to this file")
    ap.add_argument("--json", default=None, help="append one JSON object per index to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T, H, G, D, S, k = args.tokens, args.kv_heads, args.gqa, args.dim, args.page_size, args.k
    reg = get_registry()
    names = args.indexes or reg.names("index")

    lines: list[str] = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    emit(f"# {_cpu()}; {_versions()}")
    emit(f"# T={T} B=1 Hkv={H} Hq={H * G} D={D} S={S} k={k} threads={args.threads} "
         f"queries={args.queries} adds={args.adds}")
    emit(f"{'index':<18} {'build ms':>9} {'search us':>10} {'add us/page':>11} {'recall@k':>8} "
         f"{'B/token':>8} {'pages/head':>10}")
    keys = clustered_keys(B=1, H=H, T=T + args.adds * S, D=D, clusters=max(16, T // 512), seed=0)
    g = torch.Generator().manual_seed(1)
    qs = []
    for _ in range(args.queries):
        at = torch.randint(0, T, (H, G), generator=g)
        q = keys[0, torch.arange(H)[:, None], at].reshape(1, H * G, D)
        qs.append(q + 0.5 * torch.randn(q.shape, generator=g))
    runs = [(name, name, {}, None) for name in names]
    if args.sweep:  # the settings docs/indexes.md compares (label, name, constructor kwargs, SearchParams)
        runs = [
            *[(f"ivf nprobe={n}", "faiss_ivf", {}, SearchParams(nprobe=n)) for n in (2, 4, 8, 16, 32, 128)],
            ("ivf centroid-rank", "faiss_ivf", {"nprobe": 0}, None),
            ("pq m=D/4", "faiss_pq", {"m": D // 4}, None),
            ("pq m=D/2", "faiss_pq", {}, None),
            *[(f"hnsw c={c}", "faiss_hnsw", {"oversample": c}, None) for c in (1.0, 2.0, 4.0)],
            *[(f"hnswlib c={c}", "hnswlib", {"oversample": c}, None) for c in (1.0, 2.0)],
        ]
    for label, name, kwargs, params in runs:
        cls = reg.get("index", name)
        centroid_rank = kwargs.pop("nprobe", None) == 0  # rank pages by their list's centroid score only
        warm = _make(cls, args.threads, kwargs)  # warm-up: imports, allocator, lazy numpy modules
        warm.build(keys[:, :, :512], page_size=S)
        warm.add(keys[:, :, 512 : 512 + S])
        warm.search(qs[0], k)
        idx = _make(cls, args.threads, kwargs)
        t0 = time.perf_counter()
        lay = idx.build(keys[:, :, :T], page_size=S)
        tb = time.perf_counter() - t0
        nbytes = idx.nbytes
        search = _centroid_rank_search(idx) if centroid_rank else idx.search
        search(qs[0], k, params=params)  # warm-up
        ts, rec = [], []
        for q in qs:
            t0 = time.perf_counter()
            sel = search(q, k, params=params)
            ts.append(time.perf_counter() - t0)
            rec.append(page_recall(sel, exact_page_selection(keys[:, :, :T], lay, q, k)))
        ta = []
        for i in range(args.adds):
            t0 = time.perf_counter()
            idx.add(keys[:, :, T + i * S : T + (i + 1) * S])
            ta.append(time.perf_counter() - t0)
        row = {"index": name, "label": label, "kwargs": kwargs, "nprobe": getattr(params, "nprobe", None), "T": T,
               "kv_heads": H, "q_heads": H * G, "dim": D, "page_size": S, "k": k, "threads": args.threads,
               "build_ms": tb * 1e3, "search_us": statistics.median(ts) * 1e6,
               "add_us_per_page": statistics.median(ta) * 1e6 if ta else float("nan"),
               "recall_at_k": statistics.mean(rec), "bytes_per_token": nbytes / (H * T),
               "pages_per_head": float(lay.num_pages.float().mean())}
        emit(f"{label:<18} {row['build_ms']:9.1f} {row['search_us']:10.0f} {row['add_us_per_page']:11.0f} "
             f"{row['recall_at_k']:8.3f} {row['bytes_per_token']:8.1f} {row['pages_per_head']:10.1f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
