"""The ``kvpolicy`` command: ``plugins``, ``models``, ``generate``, ``demo``, ``eval``, ``report``, ``ablate``,
``bench decode``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _budget(s: str) -> int | None:
    s = s.strip().lower()
    if s in {"none", "all", "unlimited", "full"}:
        return None
    try:
        v = int(s.removesuffix("k")) * (1024 if s.endswith("k") else 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"budget must be a number of tokens or 'all', got {s!r}") from e
    return v


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _chunk(s: str) -> int | str | None:
    s = s.strip().lower()
    if s in {"none", "off", "0"}:
        return None
    if s == "auto":
        return "auto"
    try:
        return int(s.removesuffix("k")) * (1024 if s.endswith("k") else 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"prefill chunk must be a number of tokens, 'auto' or 'none', got {s!r}") from e


def _fixed_chunk(s: str) -> int | None:
    v = _chunk(s)
    if v == "auto":
        raise argparse.ArgumentTypeError("give a number of tokens or 'none'")
    return v


def _page_size(s: str) -> int | str:
    s = s.strip().lower()
    if s == "auto":
        return "auto"
    try:
        return int(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"page size must be a number of tokens or 'auto', got {s!r}") from e


def _positive_int(s: str) -> int:
    try:
        v = int(s.strip().lower().removesuffix("k")) * (1024 if s.strip().lower().endswith("k") else 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (e.g. 1024 or 2k), got {s!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {s!r}")
    return v


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _float_list(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def cmd_plugins(args) -> int:
    import warnings

    from kvpolicy.registry import Registry

    with warnings.catch_warnings():  # never strict here: list what loaded, then what was skipped and why
        warnings.simplefilter("ignore")
        reg = Registry(strict=False)
    rows = [e.as_dict() for e in reg.entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        _print_skipped(reg)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kvpolicy plugins")
    for c in ("kind", "name", "distribution", "version"):
        width = max([len(c), *(len(e.as_dict()[c]) for e in reg.entries())])
        t.add_column(c, no_wrap=True, min_width=width)
    t.add_column("about", no_wrap=True, overflow="ellipsis", max_width=60)
    for e in reg.entries():
        about = (e.obj.__doc__ or "").strip().split("\n")[0] if e.kind != "preset" else _preset_text(e.obj)
        t.add_row(e.kind, e.name, e.distribution, e.version, about.replace("``", ""))
    Console().print(t)
    _print_skipped(reg)
    return 0


def _print_skipped(reg) -> None:
    for b in reg.broken:
        print(f"skipped plugin {b.plugin!r} ({b.distribution}): {b.error}", file=sys.stderr)


def _preset_text(cfg: dict) -> str:
    def nm(v):
        return v if isinstance(v, str) else (v or {}).get("name", "-")

    return f"selector={nm(cfg.get('selector'))} index={nm(cfg.get('index', 'exact'))}"


def cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvpolicy.models import list_models

    t = Table(title="packaged models")
    for c in ("alias", "context", "installed", "cached", "install with"):
        t.add_column(c)
    for r in list_models():
        t.add_row(r["alias"], str(r["context"]), "yes" if r["installed"] else "no",
                  "yes" if r["cached"] else "no", r["pip_command"])
    Console().print(t)
    return 0


def _load(args):
    import torch

    from kvpolicy.models import load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(args.model, dtype=args.dtype, device=device, tp=_world(args).size)


def _world(args):
    """The tensor-parallel world of a command that takes ``--tp`` (set up in ``main``), else one process."""
    from kvpolicy.distributed import World

    return getattr(args, "world", None) or World()


def cmd_generate(args) -> int:
    from kvpolicy.generation import generate

    if (args.prompt is None) == (args.prompt_file is None):
        print("error: give exactly one of --prompt or --prompt-file", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    from kvpolicy.policy import Policy

    pool = {"cpu_pool_dtype": args.cpu_pool_dtype} if args.cpu_pool_dtype else {}
    Policy.resolve(args.policy, budget=args.budget, **pool)  # validate before loading the model
    model, tok = _load(args)
    res = generate(model, tok, prompt, policy=args.policy, budget=args.budget,
                   max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                   prefill_chunk=args.prefill_chunk, progress=_world(args).is_main, allow_overflow=args.allow_overflow,
                   **pool)
    print(res.text[0])
    if _world(args).is_main:
        print(res.summary(), file=sys.stderr)
    return 0


def _index_args(items: list[str]) -> dict[str, dict]:
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        head, sep, value = item.partition("=")
        name, dot, key = head.partition(".")
        if not (sep and dot and name and key):
            raise ValueError(f"argument {item!r} is not NAME.KEY=VALUE")
        out.setdefault(name, {})[key] = yaml.safe_load(value)
    return out


def _policy_args(items: list[str]) -> dict:
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key.strip()):
            raise ValueError(f"argument {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_ablate(args) -> int:
    from rich.console import Console

    from kvpolicy.eval.ablate import ablation_rows, parse_length, render_ablation_table, write_jsonl
    from kvpolicy.registry import get_registry

    reg = get_registry()
    for name in args.index:
        reg.get("index", name)  # unknown names fail before the model loads
    for name in args.selector:
        reg.get("selector", name.split(":", 1)[0])
    lengths = [parse_length(x) for x in args.length]
    model, tok = _load(args)
    rows = ablation_rows(model, tok, indexes=args.index, selector=args.selector, budgets=args.budget,
                         lengths=lengths, n_queries=args.queries, layers=args.layers,
                         index_args=_index_args(args.index_arg), selector_args=_index_args(args.selector_arg),
                         page_size=args.page_size, policy_args=_policy_args(args.policy_arg),
                         model_name=args.model)
    Console(width=max(140, Console().width)).print(render_ablation_table(rows))
    if args.json:
        write_jsonl(rows, args.json)
    return 0


def cmd_eval(args) -> int:
    from rich.console import Console

    from kvpolicy.eval.ablate import parse_length
    from kvpolicy.eval.report import markdown_report
    from kvpolicy.eval.runner import eval_jobs, read_rows, run_eval
    from kvpolicy.eval.tasks import resolve_tasks

    policies = args.policy
    eval_jobs(policies, args.budget, args.cpu_pool_dtype)  # unknown presets, bad budgets fail before the model loads
    world = _world(args)
    if args.fidelity and world.size > 1:
        raise ValueError("--fidelity measures every head on one process; it does not run with --tp (yet)")
    err = Console(stderr=True)
    source = None
    tasks: list[str] = []
    if args.task_file:
        from kvpolicy.eval.taskfile import read_task_file

        records, problems = read_task_file(args.task_file)
        for pr in problems:
            err.print(f"[yellow]{args.task_file}:{pr.line}: skipped: {pr.message}[/yellow]")
        if not records:
            raise ValueError(f"{args.task_file} holds no valid records")
    elif args.task != "none":
        tasks = resolve_tasks(args.task)
    if "longgen" in tasks and world.size > 1:
        raise ValueError("--task longgen compares logits on one process; it does not run with --tp (yet)")
    lengths = [parse_length(x) for x in args.length]
    model, tok = _load(args)
    if args.task_file:
        from kvpolicy.eval.taskfile import make_file_sample

        source = [make_file_sample(r, tok) for r in records]
    failed: list[dict] = []
    from kvpolicy.distributed import rank_local_path

    with rank_local_path(args.out, world) as out:  # only rank 0 writes --out
        rows = run_eval(model, tok, model_name=args.model_name or args.model, policies=policies,
                        budgets=args.budget, tasks=tasks, lengths=lengths, samples=args.samples, out=out,
                        seed=args.seed, samples_source=source, fidelity=args.fidelity,
                        prefill_chunk=args.prefill_chunk, failed=failed, allow_overflow=args.allow_overflow,
                        progress=world.is_main, cpu_pool_dtype=args.cpu_pool_dtype,
                        longgen_tokens=args.longgen_tokens)
    Console().print(markdown_report(read_rows(args.out)))
    if failed:
        print(f"kvpolicy eval: error: {len(failed)} of {len(failed) + len(rows)} cells failed (rows with 'error' "
              f"in {args.out}; a rerun tries them again)", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from kvpolicy.eval.report import (
        common_tasks,
        comparison_markdown,
        markdown_report,
        plot_report,
        split_markdown,
    )
    from kvpolicy.eval.runner import read_rows

    if args.compare is not None and (len(args.compare) != 2 or not all(args.compare)):
        raise ValueError(f"--compare takes two comma-separated policies (A,B), got {','.join(args.compare)!r}")
    for path in args.results:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"results file {path!r} does not exist")
    rows = [r for path in args.results for r in read_rows(path)]
    from kvpolicy.eval.results_file import unique_rows

    rows, dropped = unique_rows(rows)
    if dropped:
        print(f"left out {dropped} duplicate rows (same cell; the last one is kept)", file=sys.stderr)
    if args.common_tasks:
        rows, dropped = common_tasks(rows)
        for (model, length), names in sorted(dropped.items()):
            print(f"{model} at {length} tokens: left out {', '.join(names)} (not scored in every cell)", file=sys.stderr)
    text = markdown_report(rows)
    if args.compare:
        text += "\n" + comparison_markdown(rows, *args.compare)
    if args.split:
        text += "\n" + split_markdown(rows, args.split)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    if args.plots:
        for p in plot_report(rows, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from rich.console import Console

    from kvpolicy.eval.demo import demo_policies, render_demo_table, run_passkey_demo
    from kvpolicy.policy import Policy

    policies = args.policy.split(",") if args.policy else demo_policies(every_preset=args.all)
    for p in policies:
        Policy.resolve(p)
    console = Console(stderr=False)
    console.print(f"loading {args.model} ...")
    t0 = time.perf_counter()
    model, tok = _load(args)
    rows = run_passkey_demo(model, tok, context_tokens=args.length, depths=args.depths, budgets=args.budget,
                            policies=policies, max_new_tokens=args.max_new_tokens, seed=args.seed)
    console.print(render_demo_table(rows, args.budget))
    minutes, seconds = divmod(round(time.perf_counter() - t0), 60)
    console.print(f"{len(policies)} policies, {len(rows)} runs, {minutes} min {seconds:02d} s (model load included)")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rows))
        console.print(f"rows written to {args.json}")
    return 0


def cmd_bench_capacity(args) -> int:
    # runs of growing length in one process fragment the CUDA caching allocator (a 1M-token run once failed with
    # 30 GiB reserved but unallocated): expandable segments, unless the user set the allocator up (before torch
    # initialises CUDA)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from kvpolicy.bench.capacity import CapacityBenchConfig, bench_capacity, plot_capacity, print_capacity
    from kvpolicy.bench.decode import load_bench_model, split_variant
    from kvpolicy.eval.ablate import parse_length
    from kvpolicy.policy import Policy

    cfg = CapacityBenchConfig(policies=args.policy, budget=args.budget, start=parse_length(args.start),
                              max_length=parse_length(args.max_length), steps=args.steps,
                              prefill_chunk=args.prefill_chunk, fill=args.fill, dense=not args.no_dense,
                              cpu_pool_dtype=args.cpu_pool_dtype)
    for name in args.policy:
        Policy.resolve_placed(split_variant(name).spec, budget=args.budget)  # validate before loading the model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, model_name = load_bench_model(args.model, args.config, device, args.dtype or "bfloat16")
    return _run_bench(args, model, model_name, device, cfg, bench_capacity, print_capacity, plot_capacity)


def _run_bench(args, model, model_name: str, device: str, cfg, run, show, plot) -> int:
    """A benchmark's rows: run (saving the JSON after every row, so partial results survive a kill), printed,
    written to ``--json`` with the run's metadata, plotted to ``--plot``."""
    import platform

    import torch

    from kvpolicy.bench.decode import write_json
    from kvpolicy.eval.ablate import _git_sha

    world = _world(args)
    meta = {"model": model_name, "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda")
            else platform.processor(), "torch": torch.__version__, "git_sha": _git_sha(), "config": vars(cfg),
            "weights_bytes": sum(_local(p).nbytes for p in model.parameters()), "tp": world.size}
    main = world.is_main  # only rank 0 writes files
    save = (lambda rows: write_json(rows, args.json, meta)) if args.json and main else None
    rows = run(model, cfg, model_name=model_name, on_row=save, progress=main)
    show(rows)
    if args.json and main:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot and main:
        print(f"wrote {plot(rows, args.plot)}")
    return 0


def _local(t):
    """A parameter's shard on this rank (the tensor itself when not sharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


OVERFLOW_HELP = "run even when prompt + new tokens exceed the model's maximum position (default: an error)"
# kept here, not imported, so that `kvpolicy --help` loads no torch (tests/test_cli.py checks they agree)
DEMO_POLICIES = ("full", "oracle", "streaming", "icecache")  # kvpolicy.eval.demo.DEFAULT_POLICIES
DEMO_DEPTHS = (0.6, 0.75, 0.9)  # kvpolicy.eval.demo.DEFAULT_DEPTHS
DEMO_SEED = 1  # kvpolicy.eval.demo.DEFAULT_SEED
DEMO_NEW_TOKENS = 8  # kvpolicy.eval.demo.DEFAULT_NEW_TOKENS
CPU_POOL_DTYPES = ("auto", "fp8")  # kvpolicy.pool_dtype.POOL_DTYPES


def _pool_dtype_arg(s) -> None:
    s.add_argument("--cpu-pool-dtype", choices=CPU_POOL_DTYPES, default=None,
                   help="how the CPU page pool stores K/V: auto (the model's dtype) or fp8 (e4m3, one scale per page "
                        "and head: half the CPU bytes and bytes moved, dequantised on the way to the GPU); default: "
                        "the policy's own (auto)")


def cmd_bench_decode(args) -> int:

    import torch

    from kvpolicy.bench.decode import (
        DecodeBenchConfig,
        bench_decode,
        load_bench_model,
        plot_decode,
        print_table,
        split_variant,
    )
    from kvpolicy.eval.ablate import parse_length
    from kvpolicy.policy import Policy

    lengths = [parse_length(x) for x in args.length]
    for name in args.policy:
        Policy.resolve_placed(split_variant(name).spec, budget=args.budget)  # validate before loading the model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = _world(args)
    model, model_name = load_bench_model(args.model, args.config, device, args.dtype or "bfloat16", tp=world.size)
    if world.size > 1:
        device = str(model.device)
    from kvpolicy.context_length import check_context_length

    for L in lengths:
        check_context_length(model.config, L, args.steps + args.breakdown_steps, allow_overflow=args.allow_overflow,
                             what=f"--length {L}", hint="--allow-overflow")
    cfg = DecodeBenchConfig(policies=args.policy, budget=args.budget, lengths=lengths, steps=args.steps,
                            breakdown_steps=args.breakdown_steps, dense=not args.no_dense, dense_graphs=args.dense_graphs,
                            index_device=args.index_device, sdpa_backend=args.sdpa_backend,
                            prefill_chunk=args.prefill_chunk, cpu_pool_dtype=args.cpu_pool_dtype)
    return _run_bench(args, model, model_name, device, cfg, bench_decode, print_table, plot_decode)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvpolicy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("plugins", help="list registered indexes, selectors, allocators, transfers, presets")
    s.add_argument("--json", action="store_true", help="JSON list of {kind, name, distribution, version}")
    s.set_defaults(fn=cmd_plugins)

    s = sub.add_parser("models", help="list the packaged model aliases")
    s.set_defaults(fn=cmd_models)

    def model_args(s, default_model="smollm2-135m"):
        s.add_argument("--model", default=default_model, help="alias, GGUF file or HF checkpoint dir")
        s.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
        s.add_argument("--device", default=None, help="cuda if available, else cpu")

    def tp_arg(s):
        s.add_argument("--tp", type=int, default=None, metavar="N",
                       help="tensor-parallel ranks, one per GPU (CPU: gloo): launch with `torchrun --nproc-per-node N "
                            "-m kvpolicy ...` (default: as many as torchrun started; 1 without torchrun)")

    s = sub.add_parser("generate", help="generate text under a policy")
    model_args(s)
    s.add_argument("--policy", default="full", help="preset name or YAML file")
    s.add_argument("--budget", type=_budget, default=None, help="tokens (e.g. 256) or 'all'")
    s.add_argument("--prompt")
    s.add_argument("--prompt-file")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    s.add_argument("--allow-overflow", action="store_true", help=OVERFLOW_HELP)
    s.add_argument("--prefill-chunk", type=_chunk, default="auto",
                   help="tokens per forward of the streamed prompt, or 'none' for one forward (default: 8192 where "
                        "the policy can stream)")
    tp_arg(s)
    _pool_dtype_arg(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("demo", help="passkey retrieval per policy and budget on a real model (the main job)")
    model_args(s)
    which = s.add_mutually_exclusive_group()
    which.add_argument("--policy", default=None,
                       help=f"comma-separated presets (default: {', '.join(DEMO_POLICIES)})")
    which.add_argument("--all", action="store_true", help="every installed preset (`kvpolicy plugins` lists them)")
    s.add_argument("--budget", type=_int_list, default=[64, 128, 256, 512], help="comma-separated token budgets")
    s.add_argument("--length", type=int, default=4000, help="prompt length in tokens")
    s.add_argument("--depths", type=_float_list, default=list(DEMO_DEPTHS), help="needle depths in [0, 1]")
    s.add_argument("--max-new-tokens", type=int, default=DEMO_NEW_TOKENS, help="tokens after 'The pass key is'")
    s.add_argument("--seed", type=int, default=DEMO_SEED, help="haystack seed (picks the essay text and key)")
    s.add_argument("--json", default=None, help="also write one JSON object per row to this file")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("eval", help="task accuracy per policy, budget, task and length (resumable JSONL)")
    model_args(s)
    s.add_argument("--policy", type=_str_list, default=["full", "oracle", "icecache", "quest", "streaming"],
                   help="comma-separated presets; snapkv also runs as snapkv-qhidden; NAME@cuda puts the index on "
                   "the GPU, NAME:uva sets the transfer (same rows, placement in policy_config); snapkv+qafter, "
                   "h2o+qafter compress the context before reading the question (kvpress's setting)")
    s.add_argument("--budget", type=_int_list, default=[64, 128, 256, 512], help="comma-separated token budgets")
    s.add_argument("--task", default="passkey",
                   help="ruler, passkey, comma-separated task names, longgen (agreement with the full cache over a "
                   "long generation), or none (with --fidelity)")
    s.add_argument("--task-file", default=None, help="JSONL with context, question, answers (and id) per line")
    s.add_argument("--length", type=_str_list, default=["4k"], help="comma-separated lengths (4k, 8k, 4096)")
    s.add_argument("--samples", type=int, default=5,
                   help="samples per task and length (each a different needle, key and depth)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="results JSONL (appended; finished rows are skipped)")
    s.add_argument("--model-name", default=None, help="the model's name in the rows (default: --model)")
    s.add_argument("--allow-overflow", action="store_true", help=OVERFLOW_HELP)
    s.add_argument("--fidelity", action="store_true",
                   help="also measure attention fidelity per layer/head and perplexity on the essays, per length")
    s.add_argument("--prefill-chunk", type=_fixed_chunk, default=None,
                   help="stream the shared dense prefill, this many tokens per forward (exact; default: one forward)")
    s.add_argument("--longgen-tokens", type=_positive_int, default=1024,
                   help="tokens generated per sample by --task longgen (default 1024)")
    tp_arg(s)
    _pool_dtype_arg(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="markdown tables and PNG plots from eval results")
    s.add_argument("results", nargs="+", help="results JSONL files")
    s.add_argument("--markdown", default=None, help="also write the tables to this file")
    s.add_argument("--plots", default=None, help="directory for the PNG plots")
    s.add_argument("--common-tasks", action="store_true",
                   help="per model and length, keep only the tasks that every policy and budget scored")
    s.add_argument("--compare", type=_str_list, default=None, metavar="A,B",
                   help="paired comparison of two policies on the same samples, per budget: wins/ties/losses "
                   "and the 95%% bootstrap interval of the mean difference")
    s.add_argument("--split", type=_str_list, nargs="?", const=["icecache"], default=None, metavar="POLICY,...",
                   help="split the gap from full to each policy (default icecache), per budget, into the budget "
                   "(full - oracle-token), pages (oracle-token - the page oracle of its page size) and the search "
                   "(page oracle - policy), with 95%% bootstrap intervals")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("ablate", help="indexes x budgets on a real model's keys and queries (recall, mass, speed)")
    model_args(s)
    s.add_argument("--index", type=_str_list, default=["exact", "dci_tree"], help="comma-separated index names")
    s.add_argument("--selector", type=_str_list, default=["index_topk"],
                   help="comma-separated selector names; NAME:tag names a variant set by --selector-arg")
    s.add_argument("--budget", type=_int_list, default=[64, 128, 256], help="comma-separated token budgets")
    s.add_argument("--length", type=_str_list, default=["4k"], help="comma-separated lengths (4k, 8k, 4096)")
    s.add_argument("--page-size", type=_page_size, default=16,
                   help="page size of every policy in the grid, or 'auto' (chosen from the budget: 4 at <= 64 tokens, "
                        "8 at <= 128, else 16)")
    s.add_argument("--queries", type=int, default=16, help="decode-position queries per layer")
    s.add_argument("--layers", type=_int_list, default=None, help="comma-separated layer indexes (default: all)")
    s.add_argument("--index-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="index hyperparameter, e.g. dci_tree.device=cuda (repeatable)")
    s.add_argument("--selector-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="selector hyperparameter, e.g. arkvale:sphere.digest=sphere_max (repeatable)")
    s.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="policy field of every policy in the grid, e.g. 'split_tokens={64: [8, 8]}' (repeatable)")
    s.add_argument("--json", default=None, help="append one JSON object per row to this file")
    s.set_defaults(fn=cmd_ablate)

    bench = sub.add_parser("bench", help="latency and memory benchmarks").add_subparsers(dest="bench", required=True)
    s = bench.add_parser("decode", help="time per output token, its breakdown and memory vs dense decoding")
    s.add_argument("--model", default=None, help="alias, GGUF file or HF checkpoint dir (real weights)")
    s.add_argument("--config", default="llama3-8b", help="random-weight configuration when --model is not given")
    s.add_argument("--dtype", default=None, help="bfloat16 (default), float16, float32")
    s.add_argument("--device", default=None, help="cuda if available, else cpu")
    s.add_argument("--policy", type=_str_list, default=["icecache"], help="comma-separated presets; NAME@cuda puts the index on the GPU, NAME:uva sets the transfer, "
                   "a trailing +graphs captures each layer's decode step in a CUDA graph (experimental), +defer defers "
                   "page insertions, +prefetch / +estimate select and load pages ahead of the step")
    s.add_argument("--budget", type=_budget, default=256, help="tokens (e.g. 256) or 'all'")
    s.add_argument("--length", type=_str_list, default=["8k"], help="comma-separated context lengths (8k,32k)")
    s.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    s.add_argument("--breakdown-steps", type=int, default=8, help="further device-synced steps for the breakdown")
    s.add_argument("--allow-overflow", action="store_true", help=OVERFLOW_HELP)
    s.add_argument("--index-device", default=None, help="put the policies' index on this device (cpu, cuda)")
    s.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    s.add_argument("--dense-graphs", action="store_true",
                   help="also run the dense baseline with a static cache, each step replayed from one CUDA graph "
                        "(variant 'dense+graphs'; CUDA only)")
    s.add_argument("--sdpa-backend", default=None, choices=["flash", "efficient", "cudnn", "math"],
                   help="pin SDPA (prefill, dense baseline, dense layers) to one backend (default: torch's choice)")
    s.add_argument("--prefill-chunk", type=_fixed_chunk, default=None,
                   help="stream every variant's prompt, this many tokens per forward (default: one forward)")
    s.add_argument("--json", default=None, help="write {meta, rows} JSON here")
    s.add_argument("--plot", default=None, help="write the time-per-token plot (PNG) here")
    tp_arg(s)
    _pool_dtype_arg(s)
    s.set_defaults(fn=cmd_bench_decode)

    s = bench.add_parser("capacity", help="double each variant's context until it fails: GPU and host memory, "
                                          "time to first token, time per token")
    s.add_argument("--model", default=None, help="alias, GGUF file or HF checkpoint dir (real weights)")
    s.add_argument("--config", default="llama3-8b-1m", help="random-weight configuration when --model is not given")
    s.add_argument("--dtype", default=None, help="bfloat16 (default), float16, float32")
    s.add_argument("--device", default=None, help="cuda if available, else cpu")
    s.add_argument("--policy", type=_str_list, default=["quest:uva", "icecache-bounded@cuda:uva"],
                   help="comma-separated variants, as in bench decode")
    s.add_argument("--budget", type=_budget, default=256, help="tokens (e.g. 256) or 'all'")
    s.add_argument("--start", default="32k", help="first context length (doubled until a run fails)")
    s.add_argument("--max-length", default="1m", help="last context length tried")
    s.add_argument("--steps", type=int, default=16, help="timed decode steps per run")
    s.add_argument("--prefill-chunk", type=int, default=8192, help="tokens per forward (or per fill chunk)")
    s.add_argument("--fill", default="prefill", choices=["prefill", "synthetic"],
                   help="run the prompt through the model, or write random K/V into the cache (no prefill attention)")
    s.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    s.add_argument("--json", default=None, help="write {meta, rows} JSON here")
    s.add_argument("--plot", default=None, help="write the GPU-memory-against-context plot (PNG) here")
    _pool_dtype_arg(s)
    s.set_defaults(fn=cmd_bench_capacity)
    return p


_AT_LEAST = {"tp": 1, "samples": 1, "max_new_tokens": 1, "steps": 1, "breakdown_steps": 0, "queries": 1, "page_size": 1,
             "length": 1, "budget": 1, "prefill_chunk": 1}
_READ_FILES = ("prompt_file", "task_file")
_WRITE_FILES = ("out", "json", "markdown")


def _check_args(args) -> None:
    """Reject bad numbers, paths and devices before anything is imported or loaded (one-line errors)."""
    for name, least in _AT_LEAST.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v < least:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {v}")
    if getattr(args, "prompt", None) == "":
        raise ValueError("--prompt is empty")
    for v in getattr(args, "depths", None) or []:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--depths must lie in [0, 1], got {v}")
    for name in _READ_FILES:
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            why = "is a directory" if os.path.isdir(path) else "is not a regular file" if os.path.exists(path) \
                else "does not exist"
            raise ValueError(f"--{name.replace('_', '-')} {path!r} {why}")
    for name in _WRITE_FILES:
        path = getattr(args, name, None)
        if isinstance(path, str) and os.path.exists(path) and not os.path.isfile(path):
            why = "a directory" if os.path.isdir(path) else "not a regular file"
            raise ValueError(f"--{name} {path!r} must be a regular file path (created if missing), not {why}")
    device = getattr(args, "device", None)
    if device:
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A command with ``--tp`` under torchrun joins the process group first; then only rank 0
    prints and writes files, and an error on any rank ends that rank with its message (tagged with the rank)
    and a non-zero exit, upon which torchrun stops the other ranks. A check that every rank runs together fails
    on every rank alike (``RankError``) and is printed once, by rank 0."""
    args = build_parser().parse_args(argv)
    from kvpolicy.errors import PluginError

    world = None
    try:
        _check_args(args)
        if not hasattr(args, "tp"):
            return args.fn(args)
        from kvpolicy.distributed import init_tensor_parallel, main_rank_output

        world = args.world = init_tensor_parallel(args.tp)
        with main_rank_output(world):
            return args.fn(args)
    except (ValueError, TypeError, ImportError, OSError, NotImplementedError, PluginError) as e:
        from kvpolicy.distributed import RankError
        from kvpolicy.distributed import world as env_world

        w = world or (env_world() if hasattr(args, "tp") else None)
        shared = isinstance(e, RankError)  # the same on every rank: rank 0 prints it
        if not (shared and w is not None and not w.is_main):
            where = w.tag() if w is not None and not shared else ""
            print(f"kvpolicy {args.cmd}: error{where}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if world is not None:
            from kvpolicy.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
