"""Where a decode step's time goes: torch.profiler over a few steps of one policy (GPU), top ops and syncs.

    python benchmarks/profile_decode.py --config llama3-8b --length 32768 --policy icecache@cuda:uva --steps 8

Prints the top operators by self CPU time and by device time, and the number of host synchronisations
(device-to-host copies, stream/device synchronize calls) per step: the decode path should have none.
"""

from __future__ import annotations

import argparse

import torch

from kvpolicy.bench.decode import DecodeBenchConfig, bench_decode, load_bench_model
from kvpolicy.cache_arg import cache_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default="llama3-8b")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--policy", default="icecache@cuda:uva")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, name = load_bench_model(args.model, args.config, dev)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    cfg = DecodeBenchConfig(policies=[args.policy], budget=args.budget, lengths=[args.length], steps=2,
                            breakdown_steps=0, dense=False)
    import kvpolicy.bench.decode as bd

    orig = bd._run_variant

    def profiled(model, ids, cache, cfg):  # prefill and two warm steps unprofiled, then profile `steps` steps
        row = orig(model, ids, cache, cfg)
        nxt = ids[:, -1:]
        with profile(activities=acts) as prof, torch.inference_mode():
            for _ in range(args.steps):
                nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            if dev == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        ev = prof.key_averages()
        print(ev.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if dev == "cuda":
            print(ev.table(sort_by=key, row_limit=args.rows))
        syncs = {e.key: e.count for e in ev if any(s in e.key for s in ("Synchronize", "DtoH", "aten::item",
                                                                          "aten::_local_scalar_dense", "nonzero"))}
        print("host synchronisation points over", args.steps, "steps:", syncs)
        if dev == "cuda":  # where they come from: torch's sync debug mode warns at each synchronising call
            import collections
            import warnings

            where = collections.Counter()
            with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(args.steps):
                        nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    where[f"{w.filename}:{w.lineno}"] += 1
            print(f"synchronising calls per step by source line ({args.steps} steps):")
            for loc, n in where.most_common(args.rows):
                print(f"  {n / args.steps:7.1f}  {loc}")
        return row

    bd._run_variant = profiled
    bench_decode(model, cfg, model_name=name, progress=False)


if __name__ == "__main__":
    main()
