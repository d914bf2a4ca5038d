"""Prefill-build overlap and page-insertion stall, end to end through a model (latency only).

    python benchmarks/bench_overlap.py --config llama3-8b --length 36864 --json out.jsonl      # H100, random weights
    python benchmarks/bench_overlap.py --model smollm2-135m --length 4096                       # CPU, real weights

For each variant (dense ``DynamicCache``; the policy with ``overlap=True``; the same with ``overlap=False``) the
prompt is prefilled once, then ``--steps`` tokens are decoded one forward at a time with a device sync after each.
Reported: prefill time (to the first token), time to the second token (prefill + first decode step, which waits
for the background index builds), median decode step, median of the steps that insert a window page into the index
(every ``page_size`` steps) and of the others, and the cache counters (build, wait, insertion work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvpolicy.bench.decode import CONFIGS
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.hf import KVPolicyCache
from kvpolicy.policy import Policy

LLAMA3_8B = CONFIGS["llama3-8b"]


def load(args):
    if args.model:
        from kvpolicy.models import load as load_model

        return load_model(args.model, device=args.device)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def run(model, ids, cache, steps: int, dev: str) -> dict:
    sync(dev)
    t0 = time.perf_counter()
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    sync(dev)
    prefill = time.perf_counter() - t0
    layer = cache.layers[cache.policy_layers[0]].state if isinstance(cache, KVPolicyCache) else None
    times, inserted = [], []
    for _ in range(steps):
        before = layer.kv.win_len if layer is not None else 0
        t = time.perf_counter()
        out = model(nxt, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(dev)
        times.append(time.perf_counter() - t)
        inserted.append(layer is not None and layer.kv.win_len < before)  # this step flushed a window page
    rest = times[1:]  # the first step also waits for the background builds
    ins = [t for t, f in zip(rest, inserted[1:]) if f]
    plain = [t for t, f in zip(rest, inserted[1:]) if not f]
    row = {"prefill_s": prefill, "ttst_s": prefill + times[0], "step_ms": statistics.median(rest) * 1e3,
           "plain_step_ms": statistics.median(plain) * 1e3 if plain else None,
           "insert_step_ms": statistics.median(ins) * 1e3 if ins else None, "insert_steps": len(ins),
           "step_times_ms": [t * 1e3 for t in times]}
    if layer is not None:
        st = cache.stats()
        row.update({k: st[k] for k in ("build_s", "build_index_s", "build_pool_s", "pool_alloc_s", "wait_s",
                                       "insert_s", "insert_work_s", "pages_inserted")})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="packaged model alias (real weights); default: --config")
    ap.add_argument("--config", default="llama3-8b", choices=["llama3-8b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=36864)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--policy", default="icecache")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--index-device", default=None, help="device of the index (default: --device)")
    ap.add_argument("--variants", default="dense,overlap,inline")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    model = load(args)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0)).to(dev)
    pol = Policy.resolve(args.policy, budget=args.budget)
    idx_dev = args.index_device or dev
    pol = Policy.from_config({**pol.to_config(), "index": {**pol.index.to_config(), "device": idx_dev}})
    from transformers import DynamicCache

    rows = []
    variants = [("dense", None), (f"{args.policy} overlap", True), (f"{args.policy} inline", False)]
    keep = args.variants.split(",")
    variants = [v for v, key in zip(variants, ("dense", "overlap", "inline")) if key in keep]
    for name, overlap in variants:
        if overlap is None:
            cache = DynamicCache(config=model.config)
        else:
            cache = KVPolicyCache(model, pol, overlap=overlap)
        row = {"variant": name, "length": args.length, "device": dev, "index_device": idx_dev,
               **run(model, ids, cache, args.steps, dev)}
        rows.append(row)
        model.set_attn_implementation("sdpa")
        del cache
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name:<20} prefill {row['prefill_s']:.3f} s  TTST {row['ttst_s']:.3f} s  step {row['step_ms']:.2f} ms"
              f"  plain {fmt(row['plain_step_ms'])} ms  inserting ({row['insert_steps']}) "
              f"{fmt(row['insert_step_ms'])} ms"
              + (f"  | build {row['build_s']:.3f} s  wait {row['wait_s']:.3f} s  insert stall {row['insert_s']:.3f} s"
                 f"  insert work {row['insert_work_s']:.3f} s  (build: index {row['build_index_s']:.3f} s, pool write "
                 f"{row['build_pool_s']:.3f} s, pool alloc {row['pool_alloc_s']:.3f} s)" if "build_s" in row else ""),
              flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "overlap", **r}) + "\n")


if __name__ == "__main__":
    main()
