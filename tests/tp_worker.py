"""Tensor-parallel generation on one model, as ``torchrun --nproc-per-node N tests/tp_worker.py MODEL OUT.json`` or
in one process (``python tests/tp_worker.py MODEL OUT.json``, the reference). Used by tests/test_tensor_parallel.py
on a tiny checkpoint (gloo, CPU) and by hand on ``qwen2.5-0.5b``.

Every rank generates from the same random prompt for each (policy, budget) and checks that the ranks agree on
the tokens; rank 0 writes ``{runs: [{policy, budget, tokens, memory, memory_per_rank}], errors: {...}}``. Under
torchrun it also provokes the checks that must fail on every rank: a policy that cannot shard (``omnikv``) and a
budget that differs between ranks.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

RUNS = [("full", None), ("oracle", None), ("oracle", 128), ("quest", 128), ("streaming", 128), ("icecache", 128)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--length", type=int, default=400, help="prompt tokens (random ids)")
    p.add_argument("--new", type=int, default=8, help="new tokens per run")
    p.add_argument("--runs", default=",".join(f"{n}@{b or 'all'}" for n, b in RUNS),
                   help="comma-separated POLICY@BUDGET (budget 'all' = unlimited)")
    args = p.parse_args(argv)

    import kvpolicy
    from kvpolicy import distributed, models

    w = distributed.init_tensor_parallel(None)
    try:
        model, _ = models.load(args.model, tp=w.size)
        torch.manual_seed(0)
        ids = torch.randint(0, min(model.config.vocab_size, 1000), (1, args.length))
        runs = []
        for item in args.runs.split(","):
            name, _, b = item.partition("@")
            budget = None if b in ("", "all") else int(b)
            res = kvpolicy.generate(model, ids, policy=name, budget=budget, max_new_tokens=args.new)
            tokens = res.token_ids[0].tolist()
            if w.size > 1:  # every rank must have decoded the same tokens
                seen: list = [None] * w.size
                torch.distributed.all_gather_object(seen, tokens)
                assert all(s == tokens for s in seen), f"{item}: ranks disagree: {seen}"
            runs.append({"policy": name, "budget": budget, "tokens": tokens, "memory": res.memory,
                         "memory_per_rank": res.memory_per_rank})
        errors = {}
        if w.size > 1:
            for what, policy, budget in (("unshardable", "omnikv", 128),
                                         ("budgets", "oracle", 128 if w.rank == 0 else 256)):
                try:
                    kvpolicy.generate(model, ids, policy=policy, budget=budget, max_new_tokens=2)
                    errors[what] = None
                except distributed.RankError as e:
                    errors[what] = str(e)
        if w.is_main:
            with open(args.out, "w") as f:
                json.dump({"world": w.size, "runs": runs, "errors": errors}, f)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
