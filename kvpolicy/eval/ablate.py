"""``kvpolicy ablate``: indexes x selector x budgets on a real model's keys and queries over real text.

For each context length ``L`` the essays (``kvpolicy.eval.corpus``) are tokenized to ``L + extra`` tokens and the
model runs once, densely, capturing every attention layer's post-RoPE Q/K/V (``kvpolicy.eval.capture``). For each
(layer, index, budget) a ``PolicyLayer`` takes the first ``L`` tokens as its prompt (sink, offloaded middle,
window, exactly as in generation) and the queries at positions ``L .. L + n_queries - 1`` are the decode queries.
Per query (each number averaged over queries, then layers):

* ``recall_at_k``: page recall of the selection against the exact top-k pages of the *same* layout (pages ranked
  by their best token's q.k, GQA heads merged by interleaving; ``kvpolicy.testing.exact_page_selection``);
* ``mass_recall``: softmax attention mass over the offloaded tokens (summed over the GQA group) that the selected
  pages hold, divided by the mass the best ``k`` pages of that layout hold (1.0 = oracle by mass);
* ``rel_out_error``: ``|o_sel - o_full| / |o_full|`` per query head, where ``o_full`` attends over all ``L`` prompt
  tokens and ``o_sel`` over the sink, the selected pages and the window;
* ``search_us``: wall time of one ``Selector.select`` call (all heads of one layer, one step);
* ``build_ms``: ``Index.build`` of the offloaded tokens of one layer; ``add_us_per_page``: ``Index.add`` of one
  page of the following real keys (null where the index has no ``add``); ``bytes_per_token``: ``Index.nbytes``
  divided by the offloaded tokens; ``selector_bytes_per_token``: the same for the selector's own metadata
  (``Selector.nbytes`` where a selector reports it: digests, PQ codes, hash tables).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvpolicy.eval.capture import LayerQKV, capture_qkv
from kvpolicy.layer import PolicyLayer
from kvpolicy.policy import Policy
from kvpolicy.testing import exact_page_selection, page_recall
from kvpolicy.types import PAD, PageLayout, Selection

__all__ = ["ablation_rows", "parse_length", "render_ablation_table", "selection_metrics"]

REQUIRED_KEYS = ("index", "selector", "budget_tokens", "length", "recall_at_k", "mass_recall", "rel_out_error",
                 "build_ms", "add_us_per_page", "search_us", "bytes_per_token")


def parse_length(s: str | int) -> int:
    """'4k' -> 4096, '8K' -> 8192, '1m' -> 1048576, '3000' -> 3000."""
    if isinstance(s, int):
        return s
    t = s.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1]) * scale) if scale > 1 else int(t)
    except ValueError:
        raise ValueError(f"length {s!r} is not a number of tokens like 4096, 4k or 1m") from None
    if n <= 0:
        raise ValueError(f"length {s!r} must be a positive number of tokens")
    return n


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _git_sha() -> str | None:
    """The commit the rows come from: ``$KVPOLICY_GIT_SHA`` if set (a copied working tree may carry stale git
    metadata, as the lent GPU machine's did), else ``git rev-parse``."""
    if sha := os.environ.get("KVPOLICY_GIT_SHA", "").strip():
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def full_layout(layer: PolicyLayer) -> PageLayout:
    """The layout of every page a prefilled layer holds, read back from its CPU pool."""
    pool, num = layer.kv.cpu_pool, layer.index.num_pages.cpu()
    P = int(num.max()) if num.numel() else 0
    ids = torch.arange(P).expand(pool.batch_size, pool.num_kv_heads, P)
    return PageLayout(page_ids=torch.where(ids < num.unsqueeze(-1), ids, PAD), token_ids=pool.token_ids[:, :, :P],
                      lengths=pool.lengths[:, :, :P], num_pages=num, num_tokens=layer.index.num_tokens)


def selection_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, n_sink: int,
                      layout: PageLayout, sel: Selection) -> dict[str, float]:
    """Metrics of one selection. q [B, Hq, D]; k, v [B, Hkv, L, D] the whole prompt; layout over the offloaded
    tokens (index-local id i = prompt position n_sink + i); the sink before and the window after them are
    always attended. Also per KV head: ``mass_recall_heads`` and ``rel_out_error_heads`` (the latter averaged
    over the head's GQA group), lists of ``Hkv`` floats.

    ``mass_recall`` is relative to the best pages *of this layout* (same page count), so it does not compare
    layouts of different page sizes (64 single tokens vs 4 pages of 16); ``mass_captured`` does: the share of
    the full softmax mass (every prompt token) on the attended tokens (sink, selected pages, window), averaged
    over the GQA group (``mass_captured_heads`` per KV head)."""
    B, H, L, D = k.shape
    G = q.shape[1] // H
    qf, kf, vf = q.float().view(B, H, G, D), k.float(), v.float()
    logits = torch.einsum("bhgd,bhtd->bhgt", qf, kf) * scaling  # [B, H, G, L]
    o_full = torch.einsum("bhgt,bhtd->bhgd", logits.softmax(-1), vf)
    # token -> page of the offloaded middle
    n_mid = layout.num_tokens
    tok_page = torch.full((B, H, n_mid), PAD, dtype=torch.int64)
    valid = layout.token_ids >= 0
    b_i = torch.arange(B).view(B, 1, 1, 1).expand_as(layout.token_ids)[valid]
    h_i = torch.arange(H).view(1, H, 1, 1).expand_as(layout.token_ids)[valid]
    tok_page[b_i, h_i, layout.token_ids[valid]] = layout.page_ids.unsqueeze(-1).expand_as(layout.token_ids)[valid]
    P = int(layout.num_pages.max()) if n_mid else 0
    picked = torch.zeros((B, H, P + 1), dtype=torch.bool)
    ids = sel.page_ids.cpu()
    picked.scatter_(-1, torch.where(ids >= 0, ids, P), True)
    keep = torch.ones((B, H, L), dtype=torch.bool)  # sink and window
    mid = tok_page.clamp(min=0)
    keep[:, :, n_sink : n_sink + n_mid] = picked[..., :P].gather(-1, mid) & (tok_page >= 0)
    keep = keep.to(logits.device)
    o_sel = torch.einsum("bhgt,bhtd->bhgd", logits.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1), vf)
    err_h = ((o_sel - o_full).norm(dim=-1) / o_full.norm(dim=-1).clamp(min=1e-12)).mean(dim=(0, 2))  # [H]
    cap_h = (logits.softmax(-1) * keep[:, :, None]).sum(-1).mean(dim=(0, 2))  # [H] absolute mass attended
    # attention mass over the offloaded tokens, per page, summed over the GQA group
    m = logits[..., n_sink : n_sink + n_mid].softmax(-1).sum(2).cpu()  # [B, H, n_mid]
    pmass = torch.zeros((B, H, P + 1)).scatter_add_(-1, torch.where(tok_page >= 0, tok_page, P), m)[..., :P]
    kk = int((ids >= 0).sum(-1).max()) if ids.numel() else 0
    best = pmass.topk(min(kk, P), dim=-1).values.sum(-1) if kk else torch.zeros(B, H)
    got = (pmass * picked[..., :P]).sum(-1)
    mass_h = (got / best.clamp(min=1e-12)).clamp(max=1.0).mean(0) if kk else torch.ones(H)  # [H]
    return {"mass_recall": float(mass_h.mean()), "rel_out_error": float(err_h.mean()),
            "mass_captured": float(cap_h.mean()), "mass_recall_heads": mass_h.tolist(),
            "rel_out_error_heads": err_h.cpu().tolist(), "mass_captured_heads": cap_h.cpu().tolist()}


def _one(layer_qkv: LayerQKV, layer_idx: int, policy: Policy, L: int, n_queries: int) -> dict[str, Any]:
    """Metrics of one (layer, policy) over the queries after position L."""
    c = layer_qkv
    dev = c.k.device
    k, v = c.k[:, :, :L], c.v[:, :, :L]
    pl = PolicyLayer(policy, layer_idx)
    if pl.selector.follows_layer(layer_idx) is not None:
        raise ValueError(f"selector {policy.selector.name!r} reuses another layer's selection at layer {layer_idx}; "
                         "a single-layer ablation cannot run it")
    pl.prefill(k, v, queries=c.q[:, :, :L] if pl.selector.needs_prompt_queries else None)
    build_ms = pl.stats.build_index_s * 1e3
    layout = full_layout(pl)
    n_sink = pl.kv.sink_k.shape[2]
    mid_k = k[:, :, n_sink : n_sink + layout.num_tokens].cpu()
    rec, mass, err, search = [], [], [], []
    for j in range(n_queries):
        q = c.q[:, :, L + j]  # [B, Hq, D]
        ctx = pl.context(c.scaling)
        _sync(dev)
        t0 = time.perf_counter()
        sel = pl.selector.select(q, ctx)
        _sync(dev)
        search.append(time.perf_counter() - t0)
        kk = sel.k
        truth = exact_page_selection(mid_k, layout, q.cpu(), kk)
        rec.append(page_recall(Selection(page_ids=sel.page_ids.cpu()), truth))
        m = selection_metrics(q, k, v, c.scaling, n_sink, layout, sel)
        mass.append(m["mass_recall"])
        err.append(m["rel_out_error"])
    add_us = None
    S = policy.resolved_page_size
    if pl.index.supports_add and c.k.shape[2] >= L + S:
        page = c.k[:, :, L : L + S]
        _sync(dev)
        t0 = time.perf_counter()
        pl.index.add(page)
        _sync(dev)
        add_us = (time.perf_counter() - t0) * 1e6
    idx = pl.index
    return {"layer": layer_idx, "recall_at_k": statistics.mean(rec), "mass_recall": statistics.mean(mass),
            "rel_out_error": statistics.mean(err), "search_us": statistics.median(search[1:] or search) * 1e6,
            "build_ms": build_ms, "add_us_per_page": add_us,
            "bytes_per_token": idx.nbytes / max(idx.num_tokens, 1), "k": kk,
            "selector_bytes_per_token": getattr(pl.selector, "nbytes", 0) / max(idx.num_tokens, 1)}


def ablation_rows(model: Any, tokenizer: Any, *, indexes: Sequence[str], selector: str | Sequence[str] = "index_topk",
                  budgets: Sequence[int] = (64, 128, 256), lengths: Sequence[int] = (4096,), n_queries: int = 16,
                  layers: Sequence[int] | None = None, index_args: dict[str, dict[str, Any]] | None = None,
                  selector_args: dict[str, dict[str, Any]] | None = None, page_size: int | str = 16,
                  policy_args: dict[str, Any] | None = None, model_name: str = "",
                  progress: bool = True) -> list[dict[str, Any]]:
    """Run the grid; one row per (length, selector, index, budget). ``selector`` is one name or several (each
    crossed with every index; ``selector_args`` maps a selector name to its hyperparameters, ``NAME:tag`` keys
    give one selector several variants, e.g. ``{"arkvale:sphere": {"digest": "sphere_max"}}``). ``page_size``
    (an int or ``"auto"``) and ``policy_args`` (further ``Policy`` fields, e.g. ``split_tokens``) apply to every
    policy of the grid. Everything is validated before the model runs."""
    from kvpolicy.eval.corpus import essay_text

    index_args = index_args or {}
    selector_args = selector_args or {}
    selectors = [selector] if isinstance(selector, str) else list(selector)
    policies = {}
    for sname in selectors:
        base = sname.split(":", 1)[0]
        for name in indexes:
            for b in budgets:
                pol = Policy(**{"page_size": page_size, **(policy_args or {})},
                             selector={"name": base, **selector_args.get(sname, {})},
                             index={"name": name, **index_args.get(name, {})}, budget=b)
                pol.make_parts()  # missing optional libraries fail here, before any model work
                policies[(sname, name, b)] = pol
    for L in lengths:
        for b in budgets:
            if b > L:
                raise ValueError(f"budget of {b} tokens is larger than the context of {L} tokens")
    text = essay_text()
    all_ids = tokenizer(text[: 12 * (max(lengths) + 256)], return_tensors="pt").input_ids
    extra = max(n_queries, 16) + 1
    rows: list[dict[str, Any]] = []
    from rich.progress import Progress

    total = len(lengths) * len(policies)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ablate", total=total)
        for L in lengths:
            if all_ids.shape[1] < L + extra:
                raise ValueError(f"the essay corpus gives {all_ids.shape[1]} tokens, fewer than {L + extra}")
            bar.update(task, description=f"{L} tokens: dense forward, capturing Q/K/V")
            qkv = capture_qkv(model, all_ids[:, : L + extra], layers=list(layers) if layers is not None else None)
            use = sorted(i for i, c in qkv.items() if not c.sliding)
            for (sname, name, b), pol in policies.items():
                bar.update(task, description=f"{L} tokens: {sname} / {name} @ {b}")
                per = [_one(qkv[i], i, pol, L, n_queries) for i in use]
                mean = {key: statistics.mean(r[key] for r in per)
                        for key in ("recall_at_k", "mass_recall", "rel_out_error", "search_us", "build_ms",
                                    "bytes_per_token", "selector_bytes_per_token")}
                adds = [r["add_us_per_page"] for r in per if r["add_us_per_page"] is not None]
                rows.append({
                    "model": model_name, "index": name, "selector": sname, "budget_tokens": b, "length": L,
                    **mean, "add_us_per_page": statistics.mean(adds) if adds else None, "k": per[0]["k"],
                    "layers": use, "n_queries": n_queries, "device": str(qkv[use[0]].k.device),
                    "git_sha": _git_sha(), "policy": pol.to_config(), "per_layer": per,
                })
                bar.advance(task)
            del qkv
    return rows


def render_ablation_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    t = Table(title="ablation (means over layers and queries)")
    for c in ("length", "selector", "index", "budget", "k", "recall@k", "mass recall", "out err", "build ms", "add µs/page",
              "search µs", "B/token", "sel B/token"):
        t.add_column(c, justify="left" if c in ("index", "selector") else "right")
    for r in rows:
        add = "-" if r["add_us_per_page"] is None else f"{r['add_us_per_page']:.0f}"
        t.add_row(str(r["length"]), r["selector"], r["index"], str(r["budget_tokens"]), str(r["k"]), f"{r['recall_at_k']:.3f}",
                  f"{r['mass_recall']:.3f}", f"{r['rel_out_error']:.3f}", f"{r['build_ms']:.1f}", add,
                  f"{r['search_us']:.0f}", f"{r['bytes_per_token']:.0f}",
                  f"{r.get('selector_bytes_per_token', 0):.1f}")
    return t


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
