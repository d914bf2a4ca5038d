"""Attention fidelity and perplexity of whole policies on real long text (``kvpolicy eval --fidelity``).

These separate a bad selector from a bad model: a policy can fail a task because it drops the needle's pages
(low fidelity) or because the model fails anyway (``full`` fails too).

* **Per layer and KV head** (``per_layer_head``): the prompt is the first ``L`` tokens of the essays; one dense
  forward captures every layer's Q/K/V (``kvpolicy.eval.capture``). Each policy layer of the preset is built as
  in generation (dense layers stay dense, followers mirror their anchor's pages and reuse its selection at the
  same step) and prefilled with the first ``L`` tokens; the queries at positions ``L .. L + n - 1`` select pages.
  ``mass_recall``: the attention mass over the offloaded tokens that the selected pages hold, divided by the mass
  of the best pages of that layout (same count); ``rel_out_error``: ``|o_sel - o_full| / |o_full|`` against full
  attention over the prompt (``kvpolicy.eval.ablate.selection_metrics``). Dense layers count as 1.0 and 0.0.
  ``mass_recall`` is relative to the best pages of the policy's own layout, so it does **not** compare policies of
  different page sizes (at 128 tokens, 64 single tokens for ``pqcache``/``magicpig`` against 4 pages of 16 for
  ``quest``/``oracle``/``icecache``); ``mass_captured`` (share of the full attention mass on the attended tokens,
  dense layers 1.0) and ``rel_out_error`` do. Rows record ``page_size`` and the ``granularity`` (token/page).
* **Perplexity** (``ppl``): teacher-forced, of the ``continuation`` tokens that follow the prompt in the essays,
  decoded one token at a time under the policy (its pages really move); ``ppl_full`` is the same with the full
  cache.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.eval.ablate import full_layout, selection_metrics
from kvpolicy.eval.capture import capture_qkv
from kvpolicy.eval.runner import FIRST_DENSE, EvalJob
from kvpolicy.eval.teacher import forced_logits
from kvpolicy.hf import KVPolicyCache
from kvpolicy.layer import PolicyLayer
from kvpolicy.reference.mirror_index import MirrorIndex

__all__ = ["fidelity_row", "policy_nll"]


@torch.inference_mode()
def policy_nll(model: Any, ids: torch.Tensor, n_prompt: int, job: EvalJob | None, dense=None,
               first_logits: torch.Tensor | None = None) -> list[float]:
    """Negative log-likelihood of each token of ``ids[:, n_prompt:]`` (teacher forcing), the first predicted by the
    (dense) prefill, the others by one-token decode steps under ``job``'s policy (None: the full dense cache)."""
    from transformers import DynamicCache

    prompt, cont = ids[:, :n_prompt], ids[:, n_prompt:]
    if job is None or job.own_prefill or dense is None:
        cache = DynamicCache(config=model.config) if job is None else KVPolicyCache(model, job.policy)
        first_logits = model(prompt, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    else:
        cache = KVPolicyCache.from_dense(model, job.policy, dense)
    nll = [float(-torch.log_softmax(first_logits.float(), -1)[0, cont[0, 0]])]
    for t, logits in enumerate(forced_logits(model, cache, cont[:, :-1])):
        nll.append(float(-torch.log_softmax(logits, -1)[0, cont[0, t + 1]]))
    return nll


def _layers(job: EvalJob, qkv: dict, L: int) -> dict[int, PolicyLayer]:
    pol = job.policy
    out: dict[int, PolicyLayer] = {}
    for i in sorted(qkv):
        c = qkv[i]
        if c.sliding or i in pol.dense_layers:
            continue
        pl = PolicyLayer(pol, i)
        anchor = pl.selector.follows_layer(i)
        if anchor is not None:
            pl.index = MirrorIndex(out[anchor])
        pl.prefill(c.k[:, :, :L], c.v[:, :, :L], queries=c.q[:, :, :L] if pl.selector.needs_prompt_queries else None)
        out[i] = pl
    return out


@torch.inference_mode()
def fidelity_row(model: Any, qkv: dict, ids: torch.Tensor, L: int, job: EvalJob, n_queries: int,
                 nll_full: list[float], dense, first_logits) -> dict[str, Any]:
    """Fidelity of one (policy, budget) at prompt length ``L`` (see the module docstring)."""
    layers = _layers(job, qkv, L)
    H = next(iter(qkv.values())).k.shape[1]
    mass = {i: [[1.0] * H] for i in qkv}  # dense layers: exact
    err = {i: [[0.0] * H] for i in qkv}
    cap = {i: [[1.0] * H] for i in qkv}
    for i in layers:
        mass[i], err[i], cap[i] = [], [], []
    for j in range(n_queries):
        prev = None
        for i, pl in layers.items():
            c = qkv[i]
            q = c.q[:, :, L + j]  # [B, Hq, D]
            sel = pl.selector.select(q, pl.context(c.scaling, prev))
            prev = sel
            n_sink = pl.kv.sink_k.shape[2]
            m = selection_metrics(q, c.k[:, :, :L], c.v[:, :, :L], c.scaling, n_sink, full_layout(pl), sel)
            mass[i].append(m["mass_recall_heads"])
            err[i].append(m["rel_out_error_heads"])
            cap[i].append(m["mass_captured_heads"])
    order = sorted(qkv)
    per_mass = [[statistics.mean(col) for col in zip(*mass[i])] for i in order]  # [layers, Hkv]
    per_err = [[statistics.mean(col) for col in zip(*err[i])] for i in order]
    per_cap = [[statistics.mean(col) for col in zip(*cap[i])] for i in order]
    nll = policy_nll(model, ids, L, job, dense, first_logits)
    b = job.policy.resolve_budget()
    return {
        "task": "fidelity", "source": "essays", "length": L, "policy": job.label, "budget_tokens": job.budget,
        "budget_resolved": b.describe(), "mass_recall": statistics.mean(x for r in per_mass for x in r),
        "rel_out_error": statistics.mean(x for r in per_err for x in r),
        "mass_captured": statistics.mean(x for r in per_cap for x in r), "page_size": b.page_size,
        "granularity": "token" if b.page_size == 1 else "page",
        "ppl": math.exp(statistics.mean(nll)), "ppl_full": math.exp(statistics.mean(nll_full)),
        "continuation_tokens": len(nll), "n_queries": n_queries, "layers": order, "metric": "mass_recall",
        "per_layer_head": per_mass, "per_layer_head_error": per_err, "policy_config": job.policy.to_config(),
        "first_token": FIRST_DENSE,  # the continuation's first token is scored on the (dense) prefill's logits
    }


def fidelity_rows(model: Any, tokenizer: Any, jobs: list[EvalJob], L: int, *, n_queries: int = 8,
                  continuation: int = 64, skip=lambda job: False):
    """Yield one fidelity row per job not skipped, at prompt length ``L`` of the essays."""
    from transformers import DynamicCache

    from kvpolicy.eval.corpus import essay_text

    todo = [j for j in jobs if not skip(j)]
    if not todo:
        return
    need = L + max(n_queries, continuation)
    ids = tokenizer(essay_text()[: 12 * need], return_tensors="pt").input_ids[:, :need].to(model.device)
    if ids.shape[1] < need:
        raise ValueError(f"the essay corpus gives {ids.shape[1]} tokens, fewer than {need}")
    qkv = capture_qkv(model, ids[:, : L + n_queries])
    text = ids[:, : L + continuation]
    with torch.inference_mode():
        dense = DynamicCache(config=model.config)
        first_logits = model(text[:, :L], **cache_kwargs(dense), use_cache=True, logits_to_keep=1).logits[:, -1]
    nll_full = policy_nll(model, text, L, None)
    for job in todo:
        yield job, fidelity_row(model, qkv, text, L, job, n_queries, nll_full, dense, first_logits)
