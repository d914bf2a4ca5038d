"""``kvpolicy bench capacity``: how long a context each variant serves on this GPU, and at what cost.

For dense (transformers' ``DynamicCache``, the whole cache on the GPU) and each policy, the context doubles from
``start`` until the first failure (or ``max_length``). Per (variant, length) one row: peak GPU bytes (the
device's own peak allocation, so weights, activations, the KV working set, dense layers and every index table
are counted), the bytes each cache keeps in CPU memory, the time to the first token, and the median and mean time
per output token. An out-of-memory (GPU or host) ends that variant's doubling with a row that carries the error;
it never stops the run. ``max_context`` of a variant is the largest length that ran.

The prompt goes in one of two ways (``fill``):

* ``"prefill"``: the model runs the prompt, streamed ``prefill_chunk`` tokens per forward (dense too, under the
  ``kvpolicy`` attention, so no forward builds a mask over earlier tokens); ``ttft_s`` is its time.
* ``"synthetic"``: random K/V are written straight into every layer, one layer at a time (its index build and
  pool write as after a one-shot prefill; the GPU holds that one layer's prompt K/V meanwhile), with no attention
  over the prompt: memory and time per token at lengths whose quadratic prefill would take hours. ``ttft_s`` is
  then the fill time, not a prefill (rows say ``fill``); ``decode_peak_bytes`` is the peak of the decode steps
  alone, ``fill_peak_bytes`` that of the fill.

Prompts are random: this measures capacity and latency, never accuracy.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpolicy.bench.decode import (
    Stepper,
    _policy_layers,
    _sync,
    policy_cache,
    release_cache,
    split_variant,
    timed_prefill,
)

__all__ = ["CapacityBenchConfig", "bench_capacity", "plot_capacity", "print_capacity", "synthetic_fill"]

FILLS = ("prefill", "synthetic")


@dataclass
class CapacityBenchConfig:
    policies: list[str] = field(default_factory=lambda: ["quest:uva"])
    budget: int | None = 256
    start: int = 32768
    max_length: int = 1 << 20
    steps: int = 16
    prefill_chunk: int = 8192
    fill: str = "prefill"
    dense: bool = True
    seed: int = 0
    cpu_pool_dtype: str | None = None  # every variant's CPU pages: "auto" (model dtype), "fp8"; None: the policy's

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        for name in ("start", "max_length", "steps", "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.start > self.max_length:
            raise ValueError(f"start ({self.start}) is above max_length ({self.max_length})")


@torch.inference_mode()
def synthetic_fill(model, cache, length: int, *, seed: int = 0) -> None:
    """Write ``length`` random tokens' K/V into every layer of ``cache``, one layer at a time, as a prefill leaves
    them (see the module docstring): the GPU holds one layer's K/V of the prompt at a time, besides the cache."""
    from kvpolicy.hf import PolicyCacheLayer

    cfg = model.config
    H = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=model.device).manual_seed(seed)
    for layer in cache.layers:
        k = torch.randn((1, H, length, D), generator=g, device=model.device, dtype=model.dtype)
        v = torch.randn((1, H, length, D), generator=g, device=model.device, dtype=model.dtype)
        if isinstance(layer, PolicyCacheLayer):
            layer.lazy_initialization(k, v)
            layer.prefill(k, v)
            layer.state.wait_ready()  # its build holds this layer's K/V: one layer's at a time, as documented
        else:
            layer.update(k, v)
        del k, v
    for la in _policy_layers(cache):
        la.wait_ready()


def _host_bytes(cache) -> dict[str, int]:
    """Bytes a cache keeps in CPU memory: the (pinned) page pools and the host part of the index."""
    layers = _policy_layers(cache)
    held = [la.kv.cpu_pool for la in layers if la.kv is not None and la.kv.cpu_pool is not None]
    pools = sum(p.nbytes for p in held)
    pinned = sum(p.nbytes for p in held if p.pinned)
    index = sum(la.index.nbytes - (la.index.device_nbytes if la.device.type != "cpu" else 0) for la in layers)
    return {"host_pool_bytes": pools, "host_pinned_bytes": pinned, "host_index_bytes": index}


def _device_bytes(cache) -> dict[str, int]:
    from kvpolicy.hf import KVPolicyCache

    if isinstance(cache, KVPolicyCache):
        m = cache.memory()
        return {"device_kv_bytes": m["device_kv"], "index_device_bytes": m["index_on_device"],
                "selector_device_bytes": m["selector_on_device"]}
    kv = sum(x.keys.nbytes + x.values.nbytes for x in cache.layers if getattr(x, "keys", None) is not None)
    return {"device_kv_bytes": kv, "index_device_bytes": 0, "selector_device_bytes": 0}


def _error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"GPU out of memory: {str(e).splitlines()[0]}"
    if isinstance(e, MemoryError):
        return "host out of memory (MemoryError)"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _run(model, vname: str, pol, length: int, cfg: CapacityBenchConfig) -> dict[str, Any]:
    from transformers import DynamicCache

    dev = model.device
    row: dict[str, Any] = {"bench": "capacity", "variant": vname, "length": length, "fill": cfg.fill,
                           "budget_tokens": None if pol is None else cfg.budget, "error": None}
    cache = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    try:
        with torch.inference_mode():
            if pol is None:
                cache = DynamicCache(config=model.config)
            else:
                cache = policy_cache(model, vname, pol, cfg.prefill_chunk, cfg.cpu_pool_dtype)
            if cfg.fill == "prefill":
                g = torch.Generator().manual_seed(cfg.seed)
                ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(dev)
                nxt, row["ttft_s"] = timed_prefill(model, ids, cache, cfg.prefill_chunk)
            else:
                _sync(dev)
                t0 = time.perf_counter()
                synthetic_fill(model, cache, length, seed=cfg.seed)
                _sync(dev)
                row["ttft_s"] = time.perf_counter() - t0
                nxt = torch.zeros((1, 1), dtype=torch.long, device=dev)
            if dev.type == "cuda":
                row["fill_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            step = Stepper(model, cache, nxt)
            step()  # the first step waits for background builds: not a steady-state step
            times = [step() for _ in range(cfg.steps)]
            if dev.type == "cuda":
                row["decode_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        row["tpot_ms"] = statistics.median(times) * 1e3
        row["tpot_mean_ms"] = statistics.fmean(times) * 1e3
        row.update(_device_bytes(cache))
        row.update(_host_bytes(cache))
    except Exception as e:  # noqa: BLE001 (an out-of-memory or any failure is a row: the doubling stops there)
        row["error"] = _error(e)
    finally:
        if dev.type == "cuda":  # the peak of the fill and of the decode steps, whichever is higher
            row["device_peak_bytes"] = max(torch.cuda.max_memory_allocated(dev), row.get("fill_peak_bytes", 0))
            row["device_peak_over_weights_bytes"] = row["device_peak_bytes"] - base
        row["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        release_cache(model, cache)
        del cache
    return row


def bench_capacity(model, cfg: CapacityBenchConfig, *, model_name: str = "", progress: bool = True,
                   on_row=None) -> list[dict]:
    """Double each variant's context until it fails (see the module docstring); one row per run."""
    from kvpolicy.policy import Policy, split_placement

    pols: list[tuple[str, Any]] = [("dense", None)] if cfg.dense else []
    for name in cfg.policies:  # every name resolves before the first run
        preset, idx_dev, transfer = split_placement(split_variant(name).spec)
        pols.append((name, Policy.resolve(preset, budget=cfg.budget).placed(idx_dev, transfer)))
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        n = sum(1 for _ in _lengths(cfg))
        bar = tqdm(total=n * len(pols), desc="bench capacity", unit="run")
    for vname, pol in pols:
        done = 0
        prev = None  # this variant's last row that ran
        for length in _lengths(cfg):
            fit = _fit_context(max_ctx, cfg.steps)
            if fit and length > fit and (prev is None or prev["length"] < fit):
                length = fit  # the doubling overshoots the model's context: the last try is the context itself
            short = _host_shortfall(prev, length)
            if max_ctx and length + cfg.steps + 1 > max_ctx:
                row = {"bench": "capacity", "variant": vname, "length": length, "fill": cfg.fill,
                       "error": f"length {length} + decode steps exceeds the model's context of {max_ctx} tokens"}
            elif short is not None:
                row = {"bench": "capacity", "variant": vname, "length": length, "fill": cfg.fill, "error": short}
            else:
                row = _run(model, vname, pol, length, cfg)
                prev = row
            row["model"] = model_name
            rows.append(row)
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{vname} {length}: " + ("failed" if row.get("error") else f"{row['tpot_ms']:.1f} ms"))
            if on_row is not None:
                on_row(_with_max(rows))
            if row.get("error"):
                break
        if bar is not None:
            bar.update(sum(1 for _ in _lengths(cfg)) - done)
    if bar is not None:
        bar.close()
    return _with_max(rows)


def _fit_context(max_ctx: int | None, steps: int) -> int | None:
    """The longest prompt, a multiple of 1,024, whose decode steps stay inside the model's context (None: no
    limit). E.g. 1,047,552 for a 1,048,576-token model: a doubling from 262,144 tries it instead of 1,048,576."""
    if not max_ctx:
        return None
    return (max_ctx - steps - 1) // 1024 * 1024


def _available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _host_shortfall(prev: dict | None, length: int) -> str | None:
    """An error message if the host cannot hold ``length`` tokens of this variant, projected linearly from its
    last run (pools and host index grow with the tokens), else None. A host that runs out of memory mid-run does
    not raise: the kernel's out-of-memory killer ends the whole process (this happened at 524,288 tokens of
    ``icecache-bounded``, whose host part was 58 GiB at 262,144), so the run is not attempted."""
    if prev is None or prev.get("error"):
        return None
    held = prev.get("host_pool_bytes", 0) + prev.get("host_index_bytes", 0)
    free = _available_host_bytes()
    if not held or free is None:
        return None
    need = held * (length / prev["length"] - 1)  # more than the last run, whose memory is given back by now
    if need <= 0.9 * free:
        return None
    return (f"host out of memory (projected): {length} tokens need about {(held + need) / 2**30:.1f} GiB of "
            f"host memory for pools and index ({held / 2**30:.1f} GiB at {prev['length']}), "
            f"{free / 2**30:.1f} GiB available; not run")


def _lengths(cfg: CapacityBenchConfig):
    n = cfg.start
    while n <= cfg.max_length:
        yield n
        n *= 2


def _with_max(rows: list[dict]) -> list[dict]:
    """``max_context`` on every row: the largest length of that variant that ran (None if none did)."""
    best: dict[str, int | None] = {}
    for r in rows:
        best.setdefault(r["variant"], None)
        if not r.get("error"):
            best[r["variant"]] = max(best[r["variant"]] or 0, r["length"])
    for r in rows:
        r["max_context"] = best[r["variant"]]
    return rows


def print_capacity(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = lambda n: "" if n is None else f"{n / 2**30:.1f}"  # noqa: E731
    t = Table(title="bench capacity (GiB; ms per token: median / mean)")
    for c in ("variant", "length", "GPU peak", "over weights", "GPU KV", "GPU index", "GPU selector", "host pool",
              "host index",
              "ttft s", "ms/token", "max context", "error"):
        t.add_column(c)
    for r in rows:
        ok = not r.get("error")
        t.add_row(r["variant"], str(r["length"]), gib(r.get("device_peak_bytes")),
                  gib(r.get("device_peak_over_weights_bytes")), gib(r.get("device_kv_bytes")),
                  gib(r.get("index_device_bytes")), gib(r.get("selector_device_bytes")), gib(r.get("host_pool_bytes")),
                  gib(r.get("host_index_bytes")),
                  f"{r['ttft_s']:.1f}" if ok and r.get("ttft_s") is not None else "",
                  f"{r['tpot_ms']:.1f} / {r['tpot_mean_ms']:.1f}" if ok else "", str(r.get("max_context")),
                  (r.get("error") or "")[:60])
    Console(width=200).print(t)


def plot_capacity(rows: list[dict], path) -> Any:
    """Peak GPU memory against context length, one line per variant (a cross where a variant failed). Rows of a
    synthetic fill plot the decode steps' peak (``decode_peak_bytes``): the fill's own peak is an artefact of
    writing a whole layer at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in dict.fromkeys(r["variant"] for r in rows):
        ok = [r for r in rows if r["variant"] == v and not r.get("error") and r.get("device_peak_bytes")]
        peak = [(r.get("decode_peak_bytes") if r.get("fill") == "synthetic" else None) or r["device_peak_bytes"]
                for r in ok]
        line = ax.plot([r["length"] for r in ok], [b / 2**30 for b in peak], marker="o", label=v)
        failed = [r for r in rows if r["variant"] == v and r.get("error")]
        if failed:
            ax.plot([r["length"] for r in failed], [ax.get_ylim()[1] * 0.98] * len(failed), marker="x",
                    linestyle="none", color=line[0].get_color() if line else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title("GPU memory against context (x: the first length that failed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
