"""Integration with Hugging Face transformers (>= 5.17), without monkeypatching.

* ``KVPolicyCache`` is a ``DynamicCache`` whose full-attention layers are ``PolicyCacheLayer`` objects,
  each wrapping a ``PolicyLayer``; dense layers of the policy and sliding-window layers (Gemma 3) keep
  transformers' own layer classes.
* An attention function and a mask function are registered under the name ``"kvpolicy"`` through
  ``AttentionInterface``/``AttentionMaskInterface``. Prefill and non-policy layers run SDPA; a decode step
  of a policy layer runs the policy. The cache layer hands the new K/V to the attention function as a
  ``Handoff`` in a thread-local slot, checked against ``module.layer_idx``.

Usage::

    cache = KVPolicyCache(model, Policy.preset("oracle", budget=256))   # selects attn "kvpolicy"
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)   # kvpolicy.cache_arg
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kvpolicy.chunk_attention import partial_attention
from kvpolicy.distributed import check_tensor_parallel
from kvpolicy.errors import UnsupportedModelError
from kvpolicy.layer import MEMORY_KEYS, DecodeCursor, PolicyLayer
from kvpolicy.policy import Policy
from kvpolicy.prefetch import NextQueryEstimator, check_prefetch_mode
from kvpolicy.reference.mirror_index import MirrorIndex
from kvpolicy.streamed_prefill import check_extend

__all__ = [
    "ATTN_IMPLEMENTATION",
    "policy_attention",
    "KVPolicyCache",
    "PolicyCacheLayer",
    "SUPPORTED_MODEL_TYPES",
    "check_model_supported",
    "register_attention",
]

ATTN_IMPLEMENTATION = "kvpolicy"
DEFAULT_PREFILL_CHUNK = 8192  # tokens per forward of a streamed prefill
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")

_registered = False


@dataclass(slots=True)  # made at every step: a light one
class Handoff:
    """What ``PolicyCacheLayer.update`` leaves for the attention call of the same layer: the K/V it was given
    and what the call does with them. ``"decode"``: one token, run the policy's step; ``"extend"``: a prompt chunk
    on a layer that holds tokens (``PolicyLayer.extend``); ``"prefill"``: the prompt, handed over after SDPA once
    its queries are seen (a selector that scores them)."""

    kind: Literal["decode", "extend", "prefill"]
    layer: PolicyCacheLayer
    key: torch.Tensor  # [B, Hkv, L, D]
    value: torch.Tensor


_handoff = threading.local()  # .item: the Handoff of this thread's pending attention call, or None


_switch_lock = threading.Lock()
_switched: dict[int, list] = {}  # id(model) -> [users, the implementation before the first of them]


@contextlib.contextmanager
def policy_attention(model):
    """Run ``model`` under the ``kvpolicy`` attention for the duration of the block. The switch is made once per
    model and undone when the last of the threads using it leaves (reference-counted), so a thread that finishes
    never switches the attention away under another one still decoding; and this thread's hand-off is cleared
    on every exit (an error included). The function falls back to SDPA for calls without a policy cache."""
    register_attention()
    key = id(model)
    with _switch_lock:
        entry = _switched.get(key)
        if entry is None:
            entry = _switched[key] = [0, model.config._attn_implementation]
            if entry[1] != ATTN_IMPLEMENTATION:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
        entry[0] += 1
    try:
        yield model
    finally:
        _handoff.item = None
        with _switch_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _switched[key]
                if entry[1] != ATTN_IMPLEMENTATION:
                    model.set_attn_implementation(entry[1])


def register_attention() -> None:
    """Register the ``kvpolicy`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvpolicy_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_function(sdpa_mask))
    _registered = True


def _mask_function(sdpa_mask):
    """transformers' SDPA mask, except for a plain causal mask of a multi-token forward over earlier tokens (a
    prompt chunk after the first, a continued prompt) without padding: then no ``[queries, keys]`` mask is built
    (it would be 4 GiB for an 8k chunk at 512k tokens) and ``kvpolicy_attention`` applies the causality itself."""
    from transformers.masking_utils import causal_mask_function

    def mask(*args, **kwargs):
        q_len = kwargs.get("q_length")
        if q_len is None and kwargs.get("cache_position") is not None:  # transformers < 5.20
            q_len = kwargs["cache_position"].shape[0]
        pad = kwargs.get("attention_mask")
        if (not args and q_len is not None and q_len > 1 and kwargs.get("kv_length", 0) > q_len
                and kwargs.get("kv_offset", 0) == 0 and kwargs.get("mask_function") is causal_mask_function
                and (pad is None or bool(pad.all()))):
            return None
        return sdpa_mask(*args, **kwargs)

    return mask


def kvpolicy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query: [B, Hq, q_len, D]; returns ([B, q_len, Hq, D], None)."""
    pending = getattr(_handoff, "item", None)
    _handoff.item = None
    scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
    if pending is None:
        L = query.shape[2]
        if attention_mask is None and L > 1 and key.shape[2] > L:  # a layer of its own cache (dense, sliding)
            past = partial_attention(query, key[:, :, :-L], value[:, :, :-L], scale=scale, softcap=kwargs.get("softcap"))
            own = partial_attention(query, key[:, :, -L:], value[:, :, -L:], scale=scale, causal=True,
                                    softcap=kwargs.get("softcap"))
            return own.merge(past).output(query.dtype), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = pending.layer
    if layer.state.layer_idx != getattr(module, "layer_idx", layer.state.layer_idx):
        raise RuntimeError(
            f"kvpolicy attention called for layer {module.layer_idx} with the K/V of layer {layer.state.layer_idx}"
        )
    if pending.kind == "extend":  # a prompt chunk on a policy layer that holds tokens
        if attention_mask is not None:
            raise ValueError(f"layer {layer.state.layer_idx}: a continued prompt with an attention mask (padding) "
                             "is not supported")
        return layer.state.extend(query, pending.key, pending.value, scaling=scale, softcap=kwargs.get("softcap")), None
    if pending.kind == "prefill":  # a selector that scores the prompt's queries: prefill after SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.prefill(pending.key, pending.value, queries=query)
        return out
    cache = layer.cache
    step = layer.state.step
    prev = cache.step_selection
    out = layer.state.decode(
        query[:, :, 0], pending.key, pending.value, scaling=scale, softcap=kwargs.get("softcap"),
        prev_selection=prev[1] if prev is not None and prev[0] == step else None,
    )  # [B, Hq, D]
    cache.step_selection = (step, layer.state.last_selection)  # seen by the next policy layer of this step
    cache.prefetch_after(layer.state.layer_idx)
    return out.unsqueeze(1), None


_executor = None


def _build_executor():
    """The process-wide layer-job worker: one thread, FIFO (an anchor layer's build and insertions precede its
    mirrors'); deferred insertions are ranked (``kvpolicy.concurrency.JobQueue``)."""
    global _executor
    if _executor is None:
        import atexit

        from kvpolicy.concurrency import JobQueue

        _executor = JobQueue("kvpolicy-build")
        atexit.register(_executor.shutdown)  # let a running job finish (the worker is a daemon thread)
    return _executor


def _layer_base():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class PolicyCacheLayer(_layer_base()):
    """A transformers cache layer backed by a ``PolicyLayer``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, state: PolicyLayer, cache: KVPolicyCache):
        self.state = state
        self.cache = cache
        self.keys = self.values = None
        self.is_initialized = False

    def __repr__(self) -> str:
        return f"PolicyCacheLayer(layer={self.state.layer_idx}, policy={self.state.policy.label()!r})"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        stale = getattr(_handoff, "item", None)
        if stale is not None:  # an earlier layer's K/V never reached the kvpolicy attention function
            _handoff.item = None
            raise RuntimeError(
                f"layer {stale.layer.state.layer_idx} of a KVPolicyCache handed its K/V to an attention function that "
                f"never took them: the model does not run the {ATTN_IMPLEMENTATION!r} attention. Call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) (KVPolicyCache(model, ...) does it when given "
                "the model rather than its config), or use kvpolicy.generate"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.state.prefilled:  # the prompt is attended densely (SDPA)
            if self.state.selector.needs_prompt_queries:
                _handoff.item = Handoff("prefill", self, key_states, value_states)  # prefill once the queries are seen
            else:
                self.prefill(key_states, value_states)
                _handoff.item = None
            return key_states, value_states
        if key_states.shape[2] != 1:  # the next prompt chunk, or a continued prompt
            check_extend(self.state, key_states)  # before any state changes
            _handoff.item = Handoff("extend", self, key_states, value_states)
            return key_states, value_states
        _handoff.item = Handoff("decode", self, key_states, value_states)
        return key_states, value_states

    def prefill(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        self.state.prefill(keys, values, queries=queries, executor=self.cache.build_executor)
        self.cache.count_build(self.state)

    def get_seq_length(self) -> int:
        return self.state.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.state.reset()
        self.is_initialized = False

    def offload(self) -> None:
        """Already offloaded by construction."""

    def prefetch(self) -> None:
        """Pages are fetched per step by the policy."""

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by KVPolicyCache")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("cropping (assisted decoding) is not supported by KVPolicyCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("expanding the batch (num_return_sequences > 1) is not supported by KVPolicyCache")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("selecting batch rows is not supported by KVPolicyCache")


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_model_supported(config) -> None:
    """Raise ``UnsupportedModelError`` unless the architecture is one kvpolicy runs."""
    mt = getattr(_text_config(config), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {mt!r} is not supported by kvpolicy; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _get_dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache


class KVPolicyCache(_get_dynamic_cache()):
    """A transformers ``Cache`` that runs ``policy`` on every full-attention layer not listed as dense.

    ``model_or_config``: the model (its attention implementation is switched to ``"kvpolicy"``; the
    function falls back to SDPA for anything that is not a policy decode step) or its config (then set
    ``model.set_attn_implementation("kvpolicy")`` yourself). ``validate=True`` checks every Selection.
    ``overlap=True`` runs each layer's index build (and selector prepare) on a background worker while the next
    layers do their prefill, and each page insertion while the other layers decode; a layer's next step waits
    for its job (``stats()['wait_s']``). ``overlap=False`` runs them inline. ``defer_insert=True`` (with
    overlap, without layer reuse) lets an insertion run past the layer's next steps, its page attended from the
    window meanwhile (see ``kvpolicy.layer``): insertions then hide behind decoding, but which steps select from
    the index before the insertion depends on timing, so outputs are not reproducible at a limited budget.
    ``prefetch`` selects and loads a layer's pages before its step (``kvpolicy.prefetch``): ``"off"`` (default),
    ``"follow"`` (layers that reuse another layer's selection, as soon as it is made; exact) or ``"estimate"``
    (also every other policy layer after a policy layer, with IceCache's next-layer query estimate;
    approximate; needs the model, not its config). Not with ``defer_insert``; skipped in CUDA-graph steps.
    ``prefill_chunk``: tokens per forward when a prompt is streamed in (``kvpolicy.generation.prefill``;
    ``"auto"``: 8192 where every policy layer can take a multi-token forward after its first, else ``None``, one
    forward). Whatever the chunking, a multi-token forward on a layer that holds tokens (the next chunk, or a
    continued prompt) attends exactly to all of them (``kvpolicy.streamed_prefill``). ``cpu_pool_dtype``
    (``"auto"`` or ``"fp8"``) overrides the policy's ``Policy.cpu_pool_dtype``: how the CPU page pool stores K/V
    (``None``: the policy's, ``"auto"`` unless it says otherwise).

    A model sharded by transformers' tensor-parallel plan (under torchrun) gives each rank's attention its own
    KV heads, so this cache holds those heads only; building it runs the checks of
    ``kvpolicy.distributed.check_tensor_parallel`` on every rank (a collective) before any work.
    """

    def __init__(
        self,
        model_or_config: Any,
        policy: Policy | str | dict,
        *,
        budget: Any = ...,
        validate: bool = False,
        overlap: bool = True,
        defer_insert: bool = False,
        prefetch: str = "off",
        prefill_chunk: int | None | str = "auto",
        cpu_pool_dtype: str | None = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        check_model_supported(config)
        overrides = {} if budget is ... else {"budget": budget}
        if cpu_pool_dtype is not None:
            overrides["cpu_pool_dtype"] = cpu_pool_dtype
        self.policy = Policy.resolve(policy, **overrides)
        check_tensor_parallel(model_or_config, self.policy)  # a sharded model: each rank holds its own KV heads
        text = _text_config(config)
        n_layers = text.num_hidden_layers
        bad = [x for x in self.policy.dense_layers if x >= n_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} do not exist: the model has {n_layers} layers")
        super().__init__(config=config)
        self.step_selection = None  # (step, selection) of the last policy layer run (layer reuse)
        self.build_executor = _build_executor() if overlap else None
        self.policy_layers: list[int] = []
        for i, layer in enumerate(self.layers):
            if getattr(layer, "is_sliding", False) or i in self.policy.dense_layers:
                continue
            state = PolicyLayer(self.policy, i, validate=validate)
            anchor = state.selector.follows_layer(i)
            if anchor is not None:  # layer reuse: lay out this layer's K/V in the anchor's pages
                if anchor not in self.policy_layers:
                    raise ValueError(f"layer {i} follows layer {anchor}, which is not a policy layer")
                state.index = MirrorIndex(self.layers[anchor].state)
            self.layers[i] = PolicyCacheLayer(state, self)
            self.policy_layers.append(i)
        if defer_insert:
            if any(isinstance(self.layers[i].state.index, MirrorIndex) for i in self.policy_layers):
                raise ValueError(
                    "defer_insert does not work with layer reuse: a following layer lays out its pages from its "
                    "anchor's last insertion, so every insertion must be joined at the next step"
                )
            if not overlap:
                raise ValueError("defer_insert needs overlap=True (insertions run on the background worker)")
            cursor = DecodeCursor(n_layers)
            for i in self.policy_layers:
                self.layers[i].state.defer_insert = True
                self.layers[i].state.cursor = cursor
        self._setup_prefetch(model_or_config, check_prefetch_mode(prefetch), defer_insert)
        self.prefill_chunk = self._resolve_chunk(prefill_chunk)
        register_attention()
        if hasattr(model_or_config, "set_attn_implementation"):
            model_or_config.set_attn_implementation(ATTN_IMPLEMENTATION)

    def show_build_progress(self) -> None:
        """Show a progress bar over the policy layers' prefill jobs (index build, pool write), which run in the
        background while the prompt goes through the next layers; it closes when the last one is done."""
        from tqdm.auto import tqdm

        self._build_bar = tqdm(total=len(self.policy_layers), desc="index build", unit="layer")

    def count_build(self, state: PolicyLayer) -> None:
        bar = getattr(self, "_build_bar", None)
        if bar is None:
            return

        def done(_=None):
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        job = state._job
        if job is None:  # ran inline
            done()
        else:
            job.add_done_callback(done)

    def can_extend(self) -> str | None:
        """None if every policy layer can take a multi-token forward after its prefill (a streamed prefill's
        next chunk, a continued prompt), else why not."""
        for i in self.policy_layers:
            st = self.layers[i].state
            if not st.index.supports_add:
                return f"index {st.index.name!r} cannot add pages"
            if st.selector.needs_prompt_queries:
                return f"selector {st.selector.name!r} scores the whole prompt's queries at prefill"
        return None

    def _resolve_chunk(self, chunk: int | None | str) -> int | None:
        if chunk == "auto":  # stream when the policy can; one-shot otherwise
            return None if self.can_extend() else DEFAULT_PREFILL_CHUNK
        if chunk is None:
            return None
        S = self.policy.resolved_page_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0 or chunk % S:
            raise ValueError(f"prefill_chunk must be a positive multiple of the page size {S} (or None), got {chunk!r}")
        why = self.can_extend()
        if why:
            raise ValueError(f"prefill_chunk={chunk}: {why}, so the prompt cannot be streamed; use prefill_chunk=None")
        return chunk

    def _setup_prefetch(self, model_or_config, mode: str, defer_insert: bool) -> None:
        self.prefetch_mode = mode
        self.followers: dict[int, list[int]] = {}  # followed layer -> the layers that reuse its selection
        self.estimator = None
        if mode == "off":
            return
        if defer_insert:
            raise ValueError("prefetch does not work with defer_insert (a deferred insertion is joined by the step)")
        for i in self.policy_layers:
            anchor = self.layers[i].state.selector.follows_layer(i)
            if anchor is not None:
                self.followers.setdefault(anchor, []).append(i)
        if mode == "estimate":
            if not hasattr(model_or_config, "get_decoder"):
                raise ValueError("prefetch='estimate' needs the model (its next layer's q_proj), not its config")
            pol = set(self.policy_layers)
            followers = {f for fs in self.followers.values() for f in fs}
            targets = [i for i in self.policy_layers if i - 1 in pol and i not in followers]
            self.estimator = NextQueryEstimator(model_or_config, self, targets)

    def prefetch_after(self, layer_idx: int) -> None:
        """Called after a policy layer's decode step: prefetch the layers that follow it, and with
        ``"estimate"`` the next layer from its estimated query (see ``kvpolicy.prefetch``)."""
        if self.prefetch_mode == "off":
            return
        sel = self.layers[layer_idx].state.last_selection
        for f in self.followers.get(layer_idx, ()):
            self.layers[f].state.prefetch(prev_selection=sel)
        est = self.estimator
        if est is not None and layer_idx + 1 in est.targets:
            q = est.estimate(layer_idx + 1)
            if q is not None:
                self.layers[layer_idx + 1].state.prefetch(q, scaling=est.scaling(layer_idx + 1))

    @classmethod
    def from_dense(cls, model: Any, policy: Policy | str | dict, dense_cache, **kw) -> KVPolicyCache:
        """A cache whose prefill is taken from an already filled ``DynamicCache`` (e.g. computed once and
        reused across policies and budgets). The dense cache is not modified."""
        cache = cls(model, policy, **kw)
        if len(dense_cache.layers) != len(cache.layers):
            raise ValueError(f"dense cache has {len(dense_cache.layers)} layers, the model {len(cache.layers)}")
        for i, src in enumerate(dense_cache.layers):
            dst = cache.layers[i]
            if isinstance(dst, PolicyCacheLayer):
                dst.lazy_initialization(src.keys, src.values)
                dst.prefill(src.keys, src.values)
            else:
                cache.layers[i] = copy.deepcopy(src)
        return cache

    def memory(self) -> dict[str, int]:
        """``PolicyLayer.memory()`` summed over the layers (``kvpolicy.layer.MEMORY_KEYS``), dense layers' KV
        included."""
        tot = dict.fromkeys(MEMORY_KEYS, 0)
        for layer in self.layers:
            if isinstance(layer, PolicyCacheLayer):
                for k, v in layer.state.memory().items():
                    tot[k] += v
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                target = "cpu_kv" if layer.keys.device.type == "cpu" and torch.cuda.is_available() else "device_kv"
                tot[target] += layer.keys.nbytes + layer.values.nbytes
        return tot

    def stats(self) -> dict[str, float]:
        """Counters summed over policy layers (steps counted once)."""
        out: dict[str, float] = {}
        for i in self.policy_layers:
            self.layers[i].state.wait_ready()
            for k, v in self.layers[i].state.stats.as_dict().items():
                out[k] = out.get(k, 0) + v
        if self.policy_layers:
            out["steps"] = self.layers[self.policy_layers[0]].state.stats.steps
        return out
