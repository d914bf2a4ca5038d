"""``kvpolicy bench decode``: decode latency and memory of policies against dense decoding, in one run.

For every context length the same random prompt is run through each variant: ``dense`` (transformers'
``DynamicCache``, the whole cache on the compute device, SDPA) and one row per policy (``KVPolicyCache``).
Per variant:

* ``ttft_s``: prefill of the prompt to the first token's logits (device synchronised);
* ``ttst_s``: ``ttft_s`` plus the first decode step (which waits for background index builds);
* ``tpot_ms``: median time per output token over ``steps`` further steps, one forward each, synchronised
  after each step as a generation loop that checks for EOS would be (``tpot_mean_ms`` too);
* a breakdown over ``breakdown_steps`` more steps with ``PolicyLayer.sync_timing`` on (the device is
  synchronised at each phase boundary, so the phases are device times; these steps are slower than the
  plain ones and are reported apart): ``select_ms``, ``transfer_ms``, ``attention_ms``, ``insert_ms`` summed
  over layers per step, and ``rest_ms`` = the step minus those (the rest of the model);
* ``transfer_gbps``: bytes moved host-to-device / transfer time in the breakdown steps;
* memory: ``device_kv_bytes``, ``cpu_kv_bytes``, ``index_bytes`` (accounting of the cache),
  ``device_kv_fraction`` = device KV / (device + CPU KV), and the device's peak allocated bytes. Tensor-parallel
  (``--tp N`` under torchrun, dense and policies alike at N GPUs): these are rank 0's, per GPU, and
  ``<column>_per_rank`` lists every rank's.

A policy written ``NAME@DEVICE:TRANSFER`` (``icecache@cuda:uva``; both parts optional) runs that preset with
its index on DEVICE and/or with another transfer, so variants compare in one run. Prompts are random token ids: this measures latency, never accuracy. ``--config llama3-8b`` builds the
Llama-3.1-8B configuration with random bf16 weights; ``--model`` loads a packaged or local model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.concurrency import graph_capture
from kvpolicy.prefetch import PREFETCH_SUFFIXES, split_prefetch

__all__ = ["CONFIGS", "DecodeBenchConfig", "bench_decode", "load_bench_model", "plot_decode", "print_table", "write_json"]

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json: 32 layers, 32 q / 8 kv heads, head_dim 128, llama3 RoPE)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    # the Llama-3.1-8B shape with the RoPE of a published 1M-context Llama-3 8B (gradientai/Llama-3-8B-Instruct-
    # Gradient-1048k, model card: plain RoPE, theta 2.80B at 2^20 tokens), so benchmarks may run past 128k
    "llama3-8b-1m": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1048576,
        rope_theta=2.8e9, rms_norm_eps=1e-5,
    ),
    # a few-MB Llama with the same structure (GQA 4, head_dim 64): smoke runs and tests on a CPU
    "tiny-llama": dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
    ),
}


@dataclass
class DecodeBenchConfig:
    policies: list[str]
    budget: int | None = 256
    lengths: list[int] = field(default_factory=lambda: [8192])
    steps: int = 32
    breakdown_steps: int = 8
    dense: bool = True
    dense_graphs: bool = False  # also the dense baseline with a static cache, each step one CUDA graph
    policy_warmup: bool = True  # run each policy variant once on a short prompt first (kernel compilation)
    sdpa_backend: str | None = None  # flash, efficient, cudnn, math; None: torch's choice
    index_device: str | None = None  # None: the policy's own default
    seed: int = 0
    prefill_chunk: int | None = None  # stream the prompt, this many tokens per forward (every variant); None: one
    cpu_pool_dtype: str | None = None  # every variant's CPU pages: "auto" (model dtype), "fp8"; None: the policy's


def load_bench_model(model: str | None, config: str | None, device: str, dtype: str | None = "bfloat16",
                     tp: int = 1):
    """A packaged/local model (real weights) or a named configuration with random weights. ``tp > 1`` shards a
    packaged/local model over the torchrun ranks (``kvpolicy.models.load``)."""
    if model:
        from kvpolicy.models import load

        return load(model, dtype=dtype, device=device, tp=tp)[0], model
    if tp > 1:
        raise ValueError("--tp shards a checkpoint as it loads: give --model (a packaged alias or a local checkpoint), "
                         "not a random-weight --config")
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(LlamaConfig(**CONFIGS[config], attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(prev)
    return m.eval(), f"{config} (random bf16 weights)"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


GRAPHS_SUFFIX = "+graphs"
DEFER_SUFFIX = "+defer"


DENSE_GRAPHS = "dense+graphs"


class Variant(NamedTuple):
    spec: str  # NAME[@INDEX_DEVICE][:TRANSFER]
    graphs: bool
    defer: bool
    prefetch: str  # "off", "follow", "estimate"


def split_variant(variant: str) -> Variant:
    """``"icecache@cuda:uva+graphs+defer"`` -> ``Variant("icecache@cuda:uva", True, True, "off")``. ``+graphs``
    turns on the experimental per-layer CUDA-graph decode step (``PolicyLayer.cuda_graphs``), ``+defer``
    deferred page insertion (``KVPolicyCache(defer_insert=True)``), ``+prefetch`` / ``+estimate`` selection ahead
    of the step (``KVPolicyCache(prefetch="follow" / "estimate")``, ``kvpolicy.prefetch.split_prefetch``), for
    that variant only; in any order."""
    flags = {GRAPHS_SUFFIX: False, DEFER_SUFFIX: False}
    spec, prefetch, found = variant, "off", True
    while found:
        found = False
        for suffix in flags:
            if spec.endswith(suffix):
                spec, flags[suffix], found = spec[: -len(suffix)], True, True
        rest, mode = split_prefetch(spec)
        if mode != "off":
            if prefetch != "off":
                raise ValueError(f"variant {variant!r}: choose one of {', '.join(PREFETCH_SUFFIXES)}")
            spec, prefetch, found = rest, mode, True
    return Variant(spec, flags[GRAPHS_SUFFIX], flags[DEFER_SUFFIX], prefetch)


def _policy_layers(cache) -> list:
    return [cache.layers[i].state for i in getattr(cache, "policy_layers", [])]


def _kv_bytes(cache) -> dict[str, int]:
    from kvpolicy.hf import KVPolicyCache

    if isinstance(cache, KVPolicyCache):
        return cache.memory()
    from kvpolicy.layer import MEMORY_KEYS

    dev = sum(x.keys.nbytes + x.values.nbytes for x in cache.layers if getattr(x, "keys", None) is not None)
    return {**dict.fromkeys(MEMORY_KEYS, 0), "device_kv": dev}


def _timing_row(ttft: float, ttst: float, times: list[float], tokens: list[torch.Tensor]) -> dict[str, Any]:
    """Times of one run (seconds in, ms per step out) and its greedy output (read after the timing; every
    variant decodes the same prompt)."""
    return {"ttft_s": ttft, "ttst_s": ttst, "tpot_ms": statistics.median(times) * 1e3,
            "tpot_mean_ms": statistics.fmean(times) * 1e3, "step_times_ms": [round(t * 1e3, 3) for t in times],
            "tokens": torch.cat(tokens, 1)[0].tolist()}


def timed_prefill(model, ids: torch.Tensor, cache, chunk: int | None) -> tuple[torch.Tensor, float]:
    """Prefill ``ids`` into ``cache`` (streamed, ``chunk`` tokens per forward, or one forward): the first token
    ``[1, 1]`` and the seconds to it (device synchronised). A streamed dense cache runs under the ``kvpolicy``
    attention too, so no chunk builds a mask over the earlier tokens."""
    from kvpolicy.generation import prefill

    if chunk and not hasattr(cache, "policy_layers"):
        from kvpolicy.hf import ATTN_IMPLEMENTATION, register_attention

        register_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    dev = model.device
    _sync(dev)
    t0 = time.perf_counter()
    nxt = prefill(model, cache, ids, chunk).argmax(-1, keepdim=True)
    _sync(dev)
    return nxt, time.perf_counter() - t0


class Stepper:
    """Greedy decode steps, one forward each, synchronised after each (as a loop that checks for EOS would be)."""

    def __init__(self, model, cache, first: torch.Tensor):
        self.model, self.cache, self.nxt, self.tokens = model, cache, first, [first]

    def __call__(self) -> float:
        t = time.perf_counter()
        o = self.model(self.nxt, **cache_kwargs(self.cache), use_cache=True)
        self.nxt = o.logits[:, -1:].argmax(-1)
        _sync(self.model.device)
        self.tokens.append(self.nxt)
        return time.perf_counter() - t


@torch.inference_mode()
def _run_variant(model, ids: torch.Tensor, cache, cfg: DecodeBenchConfig) -> dict[str, Any]:
    nxt, ttft = timed_prefill(model, ids, cache, cfg.prefill_chunk)
    step = Stepper(model, cache, nxt)
    tokens = step.tokens
    first = step()
    times = [step() for _ in range(cfg.steps)]
    row = _timing_row(ttft, ttft + first, times, tokens)
    layers = _policy_layers(cache)
    if layers and cfg.breakdown_steps:
        for la in layers:
            la.wait_ready()
        before = [la.stats.as_dict() for la in layers]
        for la in layers:
            la.sync_timing = True
        try:
            bt = [step() for _ in range(cfg.breakdown_steps)]
        finally:
            for la in layers:
                la.sync_timing = False
        n = cfg.breakdown_steps
        after = [la.stats.as_dict() for la in layers]
        delta = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in before[0]}
        parts = {f"{k}_ms": delta[f"{k}_s"] / n * 1e3 for k in ("select", "transfer", "attention", "insert")}
        step_ms = statistics.fmean(bt) * 1e3
        row.update(parts)
        row["breakdown_step_ms"] = step_ms
        row["rest_ms"] = step_ms - sum(parts.values())
        row["pages_moved_per_step"] = delta["pages_moved"] / n
        row["bytes_moved_per_step"] = delta["bytes_moved"] / n
        row["transfer_gbps"] = delta["bytes_moved"] / delta["transfer_s"] / 1e9 if delta["transfer_s"] else None
    if layers:  # where the prefill jobs and insertions spent their time, summed over layers (seconds)
        for la in layers:
            la.wait_ready()
        stats = [la.stats.as_dict() for la in layers]  # read once (device counters come back to the host)
        for k in ("build_s", "build_index_s", "build_pool_s", "pool_alloc_s", "insert_work_s", "wait_s"):
            row[f"layers_{k}"] = sum(st[k] for st in stats)
        row["pages_inserted"] = sum(st["pages_inserted"] for st in stats)
        row["deferred_steps"] = sum(st["deferred_steps"] for st in stats)
        row["prefetched_steps"] = sum(st["prefetched_steps"] for st in stats)
    mem = _kv_bytes(cache)
    tot = mem["device_kv"] + mem["cpu_kv"]
    row.update({"device_kv_bytes": mem["device_kv"], "cpu_kv_bytes": mem["cpu_kv"], "index_bytes": mem["index"],
                "index_device_bytes": mem["index_on_device"], "selector_device_bytes": mem["selector_on_device"],
                "device_kv_fraction": mem["device_kv"] / tot if tot else None})
    return row


@torch.inference_mode()
def _run_dense_static(model, ids: torch.Tensor, cfg: DecodeBenchConfig, capture: bool) -> dict[str, Any]:
    """The dense baseline without the host cost of eager decoding: a ``StaticCache`` sized for the run, and
    each decode step (the whole model) replayed from one CUDA graph (``capture``; eager otherwise, for tests).
    TTST includes the capture. The prefill runs SDPA; each one-token step reads the static buffers split-K,
    only up to the positions written so far (``kvpolicy.bench.static_attention``)."""
    from transformers import StaticCache

    from kvpolicy.bench import static_attention

    dev = model.device
    L = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=L + cfg.steps + 4)
    static_attention.register()
    before = model.config._attn_implementation
    model.set_attn_implementation(static_attention.NAME)
    try:
        _sync(dev)
        t0 = time.perf_counter()
        out = model(ids, **cache_kwargs(cache), use_cache=True, cache_position=torch.arange(L, device=dev),
                    logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)  # [1, 1] the step's input, fixed storage
        _sync(dev)
        ttft = time.perf_counter() - t0
        pos = torch.tensor([L], device=dev)  # [1] cache position of the step's token
        valid = pos + 1  # [1] positions the step attends to (its own included)

        def forward() -> torch.Tensor:  # -> [1, 1] next token
            with static_attention.static_decode(valid):
                out = model(tok, **cache_kwargs(cache), use_cache=True, cache_position=pos)
            return out.logits[:, -1:].argmax(-1)

        t1 = time.perf_counter()
        if capture:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up (writes position L, which the first replay writes again)
                forward()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph):
                nxt = forward()

            def run() -> torch.Tensor:
                graph.replay()
                return nxt
        else:
            run = forward
        setup = time.perf_counter() - t1

        tokens = [tok.clone()]

        def step() -> float:
            t = time.perf_counter()
            tok.copy_(run())
            pos.add_(1)
            valid.add_(1)
            _sync(dev)
            tokens.append(tok.clone())
            return time.perf_counter() - t

        first = step()
        times = [step() for _ in range(cfg.steps)]
    finally:
        model.set_attn_implementation(before)
    kv = sum(x.keys.nbytes + x.values.nbytes for x in cache.layers if getattr(x, "keys", None) is not None)
    return {**_timing_row(ttft, ttft + setup + first, times, tokens), "device_kv_bytes": kv, "cpu_kv_bytes": 0,
            "index_bytes": 0, "index_device_bytes": 0, "selector_device_bytes": 0, "device_kv_fraction": 1.0}


# The static cache's prefill attends through a mask, which flash attention does not take: a masked call goes to the
# efficient kernel. Transformers passes no mask (and GQA to SDPA) where it can skip one, which only flash takes.
_STATIC_BACKENDS = {"flash": ("flash", "efficient")}


def _sdpa(backend: str | tuple[str, ...] | None):
    """Pin SDPA to one backend for prefill and every dense attention (the dense baseline and dense layers).
    torch's own choice can pick cuDNN attention, which plans anew for every new KV length during decoding."""
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    chosen = (backend,) if isinstance(backend, str) else tuple(backend)
    for b in chosen:
        if b not in names:
            raise ValueError(f"unknown SDPA backend {b!r}; choose one of {', '.join(names)}")
    return sdpa_kernel([names[b] for b in chosen])


@torch.inference_mode()
def _warmup(model) -> None:
    """A short dense prefill and 32 steps, so the first timed run pays no lazy initialisation (on the H200 a
    3-step warm-up left the first dense run ~1.6x slower than the same run later)."""
    from transformers import DynamicCache

    n = min(1024, (getattr(model.config, "max_position_embeddings", None) or 2048) // 2)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    out = model(ids.to(model.device), **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    for _ in range(32):
        out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True)
    _sync(model.device)


def release_cache(model, cache) -> None:
    """After a run: the policy layers' pools and indexes freed, the attention switched back, the device's cache
    emptied (the caller drops its reference to ``cache``)."""
    for la in _policy_layers(cache) if cache is not None else ():
        la.reset()
    model.set_attn_implementation("sdpa")
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def policy_cache(model, vname: str, pol, prefill_chunk: int | None = None, cpu_pool_dtype: str | None = None):
    """The cache of one policy variant, with its ``+graphs``/``+defer``/``+prefetch``/``+estimate`` flags applied
    (``cpu_pool_dtype``: see ``KVPolicyCache``)."""
    from kvpolicy.hf import KVPolicyCache

    v = split_variant(vname)
    cache = KVPolicyCache(model, pol, defer_insert=v.defer, prefetch=v.prefetch, prefill_chunk=prefill_chunk,
                          cpu_pool_dtype=cpu_pool_dtype)
    for la in _policy_layers(cache):
        la.cuda_graphs = v.graphs
    return cache


def _warmup_policy(model, vname: str, pol, cfg: DecodeBenchConfig) -> None:
    """One short run of a policy variant past a window flush, untimed: Triton kernels compile (and CUDA graphs
    capture) for the first time here, not in the first timed row (on the H100 the first policy row at 8k had
    taken 6.6 s to the second token against 2.1 s for the next variant). A failure here is left to the timed
    run, which records it."""
    n = min(min(cfg.lengths), 4096)
    if n <= (cfg.budget or 0):
        return
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(2))
    cache = policy_cache(model, vname, pol, cfg.prefill_chunk, cfg.cpu_pool_dtype)
    try:
        short = dataclasses.replace(cfg, steps=pol.resolved_page_size + 4, breakdown_steps=min(1, cfg.breakdown_steps))
        _run_variant(model, ids.to(model.device), cache, short)
    except Exception:  # noqa: BLE001 (the timed run of this variant records the error)
        pass
    finally:
        model.set_attn_implementation("sdpa")
        for la in _policy_layers(cache):
            la.reset()
        del cache
        gc.collect()


def bench_decode(
    model, cfg: DecodeBenchConfig, *, model_name: str = "", progress: bool = True, on_row=None
) -> list[dict]:
    """Run every (length, variant) of ``cfg``; one row per pair (an ``error`` key when it failed).
    ``on_row(rows)`` is called after each run with the rows so far (to save partial results)."""
    from transformers import DynamicCache

    from kvpolicy.policy import Policy, split_placement

    dev = model.device
    pols = {}
    for name in cfg.policies:  # resolve everything before the first prefill: bad names fail fast
        spec = split_variant(name).spec  # "...+graphs", "...+defer", "...+prefetch": see split_variant
        preset, idx_dev, transfer = split_placement(spec)  # "icecache@cuda:uva": index on the GPU, uva transfer
        pol = Policy.resolve(preset, budget=cfg.budget).placed(idx_dev or cfg.index_device, transfer)
        pols[name] = pol
    variants: list[tuple[str, Any]] = (([("dense", None)] if cfg.dense else [])
                                       + ([(DENSE_GRAPHS, None)] if cfg.dense_graphs else []) + list(pols.items()))
    with _sdpa(cfg.sdpa_backend):  # also validates the name before any work
        _warmup(model)
        if cfg.policy_warmup:
            for vname, pol in pols.items():
                _warmup_policy(model, vname, pol, cfg)
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    rows = []
    grid = [(L, v) for L in cfg.lengths for v in variants]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc="bench decode", unit="run")
    for L, (vname, pol) in grid:
        row: dict[str, Any] = {"bench": "decode", "model": model_name, "length": L, "variant": vname,
                               "policy": vname, "budget_tokens": None if pol is None else cfg.budget,
                               "device": str(dev), "dtype": str(model.dtype).replace("torch.", "")}
        if max_ctx and L + cfg.steps + cfg.breakdown_steps + 1 > max_ctx:
            row["error"] = f"length {L} + decode steps exceeds the model's context of {max_ctx} tokens"
            rows.append(row)
            continue
        g = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        if pol is None:
            cache = DynamicCache(config=model.config)
        else:
            cache = policy_cache(model, vname, pol, cfg.prefill_chunk, cfg.cpu_pool_dtype)
        try:
            if vname == DENSE_GRAPHS:
                if dev.type != "cuda":
                    raise RuntimeError("the captured dense baseline needs a CUDA device")
                with _sdpa(_STATIC_BACKENDS.get(cfg.sdpa_backend, cfg.sdpa_backend)):
                    row.update(_run_dense_static(model, ids, cfg, capture=True))
            else:
                with _sdpa(cfg.sdpa_backend):
                    row.update(_run_variant(model, ids, cache, cfg))
            if dev.type == "cuda":
                row["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
                row["device_peak_over_weights_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        except torch.cuda.OutOfMemoryError as e:  # record and go on with the next variant
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        except Exception as e:  # a failing variant is a result too; the others still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            release_cache(model, cache)
            del cache
        _add_ranks(row, model)
        rows.append(row)
        if on_row is not None:
            on_row(_add_ratios(rows))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{L} {vname}: " + (f"{row['tpot_ms']:.2f} ms/token" if "tpot_ms" in row else "failed"))
    if bar is not None:
        bar.close()
    return _add_ratios(rows)


_RANK_KEYS = ("device_kv_bytes", "cpu_kv_bytes", "index_bytes", "device_peak_bytes", "device_peak_over_weights_bytes")


def _add_ranks(row: dict[str, Any], model) -> None:
    """Under tensor parallelism (a collective): ``tp`` and each memory column of every rank as ``<column>_per_rank``;
    the plain columns stay this rank's (per GPU, which is what must fit)."""
    from kvpolicy.distributed import sum_over_ranks, tp_size

    n = tp_size(model)
    if n <= 1:
        return
    _, per_rank = sum_over_ranks({k: row.get(k) or 0 for k in _RANK_KEYS}, model)
    row["tp"] = n
    for k in _RANK_KEYS:
        if k in row:
            row[f"{k}_per_rank"] = [r[k] for r in per_rank]


def _add_ratios(rows: list[dict]) -> list[dict]:
    """``tpot_vs_dense`` and ``ttst_vs_dense_prefill`` against the dense row of the same length (if run), and
    ``tpot_vs_dense_graphs`` against the captured dense baseline."""
    for base, key in (("dense", "tpot_vs_dense"), (DENSE_GRAPHS, "tpot_vs_dense_graphs")):
        dense = {r["length"]: r for r in rows if r["variant"] == base and "tpot_ms" in r}
        for r in rows:
            d = dense.get(r["length"])
            if d is not None and "tpot_ms" in r:
                r[key] = r["tpot_ms"] / d["tpot_ms"]
                if base == "dense":
                    r["ttst_vs_dense_prefill"] = r["ttst_s"] / d["ttft_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    t = Table(title="decode latency and memory (per output token: median and mean step; breakdown summed over layers, "
                    "device-synced)")
    for c in ("length", "variant", "TTFT s", "TTST s", "TPOT ms", "mean", "× dense", "× dense+graphs", "select",
              "transfer", "attn",
              "insert", "rest", "GB/s", "dev KV MiB", "KV on dev", "CPU KV MiB", "index MiB (on dev)"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(str(r["length"]), r["variant"], r["error"][:60], *["-"] * 15)
            continue
        t.add_row(
            str(r["length"]), r["variant"], f(r["ttft_s"], ".3f"), f(r["ttst_s"], ".3f"), f(r["tpot_ms"], ".2f"),
            f(r.get("tpot_mean_ms"), ".2f"), f(r.get("tpot_vs_dense"), ".2f"), f(r.get("tpot_vs_dense_graphs"), ".2f"),
            f(r.get("select_ms"), ".2f"), f(r.get("transfer_ms"), ".2f"),
            f(r.get("attention_ms"), ".2f"), f(r.get("insert_ms"), ".2f"), f(r.get("rest_ms"), ".2f"),
            f(r.get("transfer_gbps"), ".2f"), f(r["device_kv_bytes"] / 2**20, ".1f"),
            f(r["device_kv_fraction"], ".1%") if r.get("device_kv_fraction") is not None else "-",
            f(r["cpu_kv_bytes"] / 2**20, ".1f"),
            f"{r['index_bytes'] / 2**20:.1f} ({r.get('index_device_bytes', 0) / 2**20:.1f})",
        )
    Console(width=200).print(t)


def plot_decode(rows: list[dict], path: str | Path) -> Path:
    """Time per output token vs context length per variant; KV + index bytes on the device on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tpot_ms" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax2 = ax.twinx()
    for i, v in enumerate(dict.fromkeys(r["variant"] for r in ok)):
        rs = sorted((r for r in ok if r["variant"] == v), key=lambda r: r["length"])
        xs = [r["length"] for r in rs]
        color = f"C{i}"
        ax.plot(xs, [r["tpot_ms"] for r in rs], "o-", color=color, label=f"{v} time/token")
        ax2.plot(xs, [(r["device_kv_bytes"] + r.get("index_device_bytes", 0)) / 2**30 for r in rs], "s--",
                 color=color, alpha=0.5, label=f"{v} device KV + index")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per output token (ms)")
    ax2.set_ylabel("KV and index bytes on the device (GiB, dashed)")
    ax.set_title(f"decode: {ok[0]['model'] if ok else ''}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(rows: list[dict], path: str | Path, meta: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
