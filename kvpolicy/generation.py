"""``kvpolicy.generate``: one call from a model and a prompt to text generated under a policy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.context_length import check_context_length
from kvpolicy.distributed import sum_over_ranks
from kvpolicy.hf import KVPolicyCache, check_model_supported, policy_attention
from kvpolicy.policy import Policy

__all__ = ["GenerationResult", "generate", "prefill", "prepare_inputs"]


@torch.inference_mode()
def prefill(model: Any, cache: Any, input_ids: torch.Tensor, chunk: int | None, *, progress: bool = False):
    """Run ``input_ids`` ``[B, T]`` through ``model`` into ``cache`` (any transformers cache that holds earlier
    tokens or none), ``chunk`` tokens per forward (``None``: one forward). Returns the last position's logits
    ``[B, vocab]``. With the ``kvpolicy`` attention, no forward builds a mask over earlier tokens and a policy
    layer streams its earlier pages back from the CPU pool (``kvpolicy.streamed_prefill``)."""
    T = input_ids.shape[1]
    if T == 0:
        raise ValueError("prefill of an empty prompt")
    step = chunk or T
    starts = range(0, T, step)
    bar = None
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc="prefill", unit="tok", unit_scale=True)
    out = None
    for s in starts:
        out = model(input_ids=input_ids[:, s : s + step], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        if bar is not None:
            bar.update(min(step, T - s))
    if bar is not None:
        bar.close()
    return out.logits[:, -1]


@dataclass
class GenerationResult:
    """What ``generate`` returns: tokens, text (when a tokenizer was given), timing and memory."""

    token_ids: torch.Tensor  # [B, new_tokens] generated ids (prompt excluded)
    text: list[str] | None
    prompt_tokens: int
    new_tokens: int
    seconds: float
    policy: dict[str, Any]
    budget: str
    memory: dict[str, int] = field(default_factory=dict)  # bytes, summed over the ranks under tensor parallelism
    stats: dict[str, float] = field(default_factory=dict)  # counters and times, summed likewise (steps once)
    memory_per_rank: list[dict[str, int]] = field(default_factory=list)  # one entry per rank (one without TP)

    def summary(self) -> str:
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        m = self.memory
        return (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.seconds:.2f} s "
            f"({self.new_tokens / max(self.seconds, 1e-9):.1f} tok/s) | budget {self.budget} | "
            f"KV on device {mib(m.get('device_kv', 0))}, KV on CPU {mib(m.get('cpu_kv', 0))}, "
            f"index {mib(m.get('index', 0))} ({mib(m.get('index_on_device', 0))} of it on the device), "
            f"selector state {mib(m.get('selector', 0))} ({mib(m.get('selector_on_device', 0))} on the device)"
            + self._covered_note() + self._ranks_note()
        )

    def _ranks_note(self) -> str:
        if len(self.memory_per_rank) <= 1:
            return ""
        per = ", ".join(f"{m.get('device_kv', 0) / 2**20:.1f}" for m in self.memory_per_rank)
        return f" | summed over {len(self.memory_per_rank)} tensor-parallel ranks (KV on device per rank: {per} MiB)"

    def _covered_note(self) -> str:
        covered, steps = int(self.stats.get("covered_steps", 0)), int(self.stats.get("steps", 0))
        if not covered:
            return ""
        # covered_steps is summed over policy layers, steps counted once: every layer covers the same steps
        layers = max(1, round(covered / steps)) if steps else 1
        return (f" | the budget held the whole context for {covered // layers} of {steps} steps "
                "(every page attended)")


def prepare_inputs(tokenizer_or_inputs: Any, prompt: str | None, *, chat: bool, device) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt`` (with the chat template if ``chat``), or normalise given inputs/ids."""
    obj = tokenizer_or_inputs
    if isinstance(obj, torch.Tensor):
        ids = obj if obj.dim() == 2 else obj.unsqueeze(0)
        inputs = {"input_ids": ids}
    elif isinstance(obj, dict) or hasattr(obj, "keys") and "input_ids" in obj:
        inputs = {k: obj[k] for k in ("input_ids", "attention_mask") if k in obj}
    elif hasattr(obj, "encode"):
        if prompt is None:
            raise ValueError("a prompt is required when a tokenizer is passed")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be one string, got {type(prompt).__name__}; for a batch pass a [B, T] "
                            "tensor of ids (rows of equal length)")
        if chat and getattr(obj, "chat_template", None):
            ids = obj.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            )["input_ids"]
        else:
            ids = obj(prompt, return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids}
    else:
        raise TypeError(f"expected a tokenizer, a dict of inputs or a tensor of ids; got {type(obj).__name__}")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor [B, T]")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (0 tokens): give at least one token")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("padded batches are not supported by kvpolicy policies: give rows of equal length")
    return {k: v.to(device) for k, v in inputs.items()}


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer_or_inputs: Any,
    prompt: str | None = None,
    *,
    policy: Policy | str | dict = "full",
    budget: int | None = None,
    max_new_tokens: int = 32,
    chat: bool = True,
    tokenizer: Any = None,
    validate: bool = False,
    defer_insert: bool = False,
    prefetch: str = "off",
    prefill_chunk: int | None | str = "auto",
    cpu_pool_dtype: str | None = None,
    progress: bool = False,
    allow_overflow: bool = False,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Greedy (by default) generation with the KV cache under ``policy`` at ``budget`` tokens.

    ``tokenizer_or_inputs`` is a tokenizer (then ``prompt`` is required and the output is decoded), a dict
    with ``input_ids`` or a ``[B, T]`` tensor of ids. ``budget=None`` means unlimited. ``defer_insert``,
    ``prefetch``, ``prefill_chunk`` (the prompt streams in, ``prefill_chunk`` tokens per forward) and
    ``cpu_pool_dtype`` (``"fp8"``: the CPU page pool holds fp8 pages; ``None``: the policy's): see ``KVPolicyCache``. ``progress`` shows a bar over the prompt's chunks and one over the layers' index builds. A prompt plus ``max_new_tokens`` beyond
    the model's maximum position is a ``ContextLengthError`` unless ``allow_overflow``.

    Under torchrun with a model sharded by transformers' tensor-parallel plan, call it on every rank with the same
    arguments: each rank's cache holds its own KV heads, every rank returns the same tokens, and ``memory`` and
    ``stats`` are summed over the ranks (``memory_per_rank`` keeps each rank's share).
    """
    check_model_supported(model.config)
    pol = Policy.resolve(policy, budget=budget, **({"cpu_pool_dtype": cpu_pool_dtype} if cpu_pool_dtype else {}))
    # validated before anything runs
    tok = tokenizer or (tokenizer_or_inputs if hasattr(tokenizer_or_inputs, "decode") else None)
    inputs = prepare_inputs(tokenizer_or_inputs, prompt, chat=chat, device=model.device)
    prompt_len = inputs["input_ids"].shape[1]
    check_context_length(model.config, prompt_len, max_new_tokens, allow_overflow=allow_overflow)
    with policy_attention(model):  # switched for this call, never under another thread's running generate
        return _generate(model, tok, inputs, pol, prompt_len, max_new_tokens=max_new_tokens, validate=validate,
                         defer_insert=defer_insert, prefetch=prefetch, prefill_chunk=prefill_chunk, progress=progress,
                         **generate_kwargs)


def _generate(model, tok, inputs, pol, prompt_len, *, max_new_tokens, validate, defer_insert, prefetch, prefill_chunk,
              progress, **generate_kwargs) -> GenerationResult:
    cache = KVPolicyCache(model, pol, validate=validate, defer_insert=defer_insert, prefetch=prefetch,
                          prefill_chunk=prefill_chunk)
    if progress:
        cache.show_build_progress()
    generate_kwargs.setdefault("do_sample", False)
    t0 = time.perf_counter()
    chunk = cache.prefill_chunk
    if chunk and prompt_len > chunk:  # stream all but the last chunk; generate() runs that one and decodes
        prefill(model, cache, inputs["input_ids"][:, : (prompt_len - 1) // chunk * chunk], chunk, progress=progress)
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=max_new_tokens, **generate_kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[:, prompt_len:]
    text = [tok.decode(row, skip_special_tokens=True) for row in new] if tok is not None else None
    memory, per_rank = sum_over_ranks(cache.memory(), model)  # a collective on a tensor-parallel model
    stats, _ = sum_over_ranks(cache.stats(), model, once=("steps",))
    return GenerationResult(
        token_ids=new, text=text, prompt_tokens=prompt_len, new_tokens=new.shape[1], seconds=seconds,
        policy=pol.to_config(), budget=pol.resolve_budget().describe(), memory=memory, stats=stats,
        memory_per_rank=per_rank,
    )
