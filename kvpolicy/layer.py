"""``PolicyLayer``: one decoder layer's KV cache under a policy (framework-agnostic).

What the layer holds (sink, window, slot pool, CPU pool) is a ``LayerKV`` (``kvpolicy.layer_kv``, with the memory
layout); the decode step itself is ``kvpolicy.step`` (select -> reserve -> load -> attend -> release, one function
for the eager, prefetched and captured steps). This class decides *when*: the prefill hands the layer's K/V over
once (the sink and the window stay on the device, the middle goes to the index, ``Index.build``, and to the CPU
pool); each decode step appends the new token to the window and runs the step; when the window holds
``window_pages`` full pages, its oldest page is inserted into the index (``Index.add``) and the CPU pool.

Deferred insertion (``defer_insert``, with a background executor): the insertion job of a full window page
need not be done by the layer's next step. Until it is joined the page stays in the window (which has one page
of room for it) and is attended from there, so no token is ever missing, and the steps in between select from
the index as it was. A per-layer lock keeps a job and a step from running at once, and CUDA events order their
device work both ways; a step joins the job once it is done, or at the latest when the window is full.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from kvpolicy.concurrency import GraphCache, capture_lock
from kvpolicy.layer_kv import LayerKV
from kvpolicy.ops import check_tensor
from kvpolicy.policy import Policy
from kvpolicy.pool import PagePool
from kvpolicy.step import (
    Clock,
    Loaded,
    capture_key,
    check_query,
    decode_step,
    device_counters,
    select_reserve_load,
)
from kvpolicy.types import SelectContext, Selection

__all__ = ["GRAPHS_ENV", "MEMORY_KEYS", "DecodeCursor", "LayerStats", "PolicyLayer"]

# the keys of ``PolicyLayer.memory()`` (and ``KVPolicyCache.memory()``), bytes each
MEMORY_KEYS = ("device_kv", "cpu_kv", "index", "index_on_device", "selector", "selector_on_device")

GRAPHS_ENV = "KVPOLICY_DECODE_GRAPHS"  # "1": capture each layer's decode step in a CUDA graph where possible


@dataclass
class DecodeCursor:
    """The layer the decode path of one cache is at (shared by its layers): deferred insertions are ranked by
    how many layer steps remain before their layer is reached again (``JobQueue.submit_ranked``)."""

    num_layers: int
    layer: int = -1

    def slack(self, layer: int) -> int:
        return (layer - self.layer - 1) % self.num_layers


@dataclass
class LayerStats:
    """Counters of one layer (cumulative over decode steps)."""

    steps: int = 0
    pages_selected: int = 0
    pages_moved: int = 0
    bytes_moved: int = 0
    pages_inserted: int = 0
    select_s: float = 0.0
    transfer_s: float = 0.0
    attention_s: float = 0.0
    insert_s: float = 0.0  # decode-path time of page insertions (the stall; the work itself if inline)
    insert_work_s: float = 0.0  # time of the insertion work (Index.add, pool write, Selector.update)
    build_s: float = 0.0  # prefill job: index build, pool write, selector prepare (inline or in the background)
    build_index_s: float = 0.0  # of which Index.build
    build_pool_s: float = 0.0  # of which the CPU pool write (device -> pinned host copy included)
    pool_alloc_s: float = 0.0  # of which allocating the layer's (pinned) CPU pool, sized after the build
    wait_s: float = 0.0  # time the decode path waited for a background job (prefill build or page insertion)
    deferred_steps: int = 0  # steps that ran beside a queued insertion, its page attended from the window
    prefetched_steps: int = 0  # steps whose pages were selected and loaded ahead (``prefetch``)
    covered_steps: int = 0  # steps whose whole context fitted in the budget: every page attended
    prompt_chunks: int = 0  # multi-token forwards after the first (streamed prefill, continued prompts)
    rebuilds: int = 0  # index builds again over a streamed prompt's tokens (Index.prefers_full_build)

    def as_dict(self) -> dict[str, float]:
        """The counters as numbers (counters that a transfer keeps on the device are read back here)."""
        return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}


_INT_HINT = " (integer K/V: pass the attention's key/value states, not token ids)"


class PolicyLayer:
    """The KV cache of one decoder layer under ``policy`` (module docstring; the layout: ``kvpolicy.layer_kv``)."""

    def __init__(self, policy: Policy, layer_idx: int, *, validate: bool = False):
        self.policy = policy
        self.layer_idx = layer_idx
        self.budget = policy.resolve_budget()
        parts = policy.make_parts()
        self.index, self.selector = parts.index, parts.selector
        if self.selector.reads_every_page(layer_idx):
            self.budget = dataclasses.replace(self.budget, retrieved_pages=None)
        self.allocator, self.transfer = parts.allocator, parts.transfer
        self.validate = validate  # check every Selection (tests, conformance); off on the hot path
        self.sync_timing = False  # synchronise the device at each phase boundary so LayerStats times are device
        # times (benchmark breakdowns); off by default: the decode path then never waits for the device
        # experimental: replay select + reserve + transfer + attention + release as one CUDA graph per layer when
        # the selector, allocator and transfer all offer a capture_key (kvpolicy.step.capture_key); env
        # KVPOLICY_DECODE_GRAPHS=1
        self.cuda_graphs = os.environ.get(GRAPHS_ENV, "0").strip() == "1"
        # let insertion jobs run past the next step (module docstring; KVPolicyCache(defer_insert=True)). Off by
        # default: which steps run beside a queued insertion depends on thread timing, so outputs are only
        # reproducible at an unlimited budget
        self.defer_insert = False
        self.cursor: DecodeCursor | None = None  # set by the cache: ranks deferred insertions
        self._state_lock = threading.Lock()  # held by a running job, and by a step that runs beside a queued one
        self.stats = LayerStats()
        self.last_selection: Selection | None = None
        self.last_add_layout = None  # layout returned by the last Index.add (read by mirror layers)
        self.graphs = GraphCache()  # the captured decode step
        self._clear()

    def _clear(self) -> None:
        self._job = self._job_inputs = None  # background job in flight (see _run_job)
        self._step_done = None  # CUDA event after the device work of a step that ran beside a queued job
        self._stream = None  # CUDA stream of the layer's background jobs
        self.executor: Executor | None = None
        self.seq_len = 0
        self.step = 0
        self.prefilled = False
        self.kv: LayerKV | None = None  # sink, window, slots, CPU pool: set by the prefill
        self._built_tokens = 0  # tokens of the last index build (see _rebuild_if_outgrown)
        self.graphs.clear()
        self._ahead: Loaded | None = None  # made by prefetch() for the step in Loaded.step
        self._ahead_stream = None  # CUDA stream that prefetch() runs on
        self._prefill_stream = None  # CUDA stream that streams pool blocks back for a prompt chunk (extend)

    def reset(self) -> None:
        with contextlib.suppress(Exception):  # a failed job's error is moot once the layer is reset
            self.wait_ready()
        if self.index is not None:
            self.index.reset()
        self.selector.reset()
        self.allocator.reset()
        self.stats = LayerStats()
        self.last_selection = None
        self._clear()

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        keys: torch.Tensor,  # [B, Hkv, T, D]
        values: torch.Tensor,  # [B, Hkv, T, D]
        *,
        queries: torch.Tensor | None = None,  # [B, Hq, T, D] the prompt's queries (selectors that need them)
        executor: Executor | None = None,
    ) -> None:
        """Take over the prompt's K/V (dense prefill attention is the caller's job).

        Input checks, the sink and the window run here. The index build, the CPU pool write and
        ``Selector.prepare`` form one job: run inline, or submitted to ``executor`` (one worker, FIFO) so that it
        overlaps the next layer's prefill; the first call that needs the result (decode, memory) waits for it
        and re-raises its error. On CUDA the job runs on its own stream, ordered after the producer of ``keys``.
        """
        for name, t in (("keys", keys), ("values", values)):
            if isinstance(t, torch.Tensor) and not t.is_floating_point():
                raise TypeError(f"layer {self.layer_idx}: {name} must be a floating tensor, got {t.dtype}{_INT_HINT}")
            check_tensor(name, t, 4, dims="[B, Hkv, T, D]")
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        if self.prefilled:
            raise RuntimeError(f"layer {self.layer_idx}: prefill of a layer that holds tokens (use extend)")
        B, H, T, D = keys.shape
        if self.selector.needs_prompt_queries:
            if queries is None:
                raise ValueError(
                    f"selector {self.selector.name!r} needs the prompt's queries (prefill-time scoring); run the "
                    "prefill through KVPolicyCache (a prefill reused from a dense cache has no queries)"
                )
            check_tensor("queries", queries, 4, dims="[B, Hq, T, D]")
            if queries.shape[0] != B or queries.shape[2] != T or queries.shape[3] != D or queries.shape[1] % H:
                raise ValueError(f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)}")
        for part in (self.index, self.selector, self.allocator, self.transfer):
            if part is not None and part.max_batch_size is not None and B > part.max_batch_size:
                raise ValueError(
                    f"batch size {B} is above what {part.kind} {part.name!r} supports ({part.max_batch_size})"
                )
        self.device, self.dtype, self.shape = keys.device, keys.dtype, (B, H, D)
        # a window with room for a page in transit where insertions may be deferred
        self.kv, mid_k, mid_v = LayerKV.from_prompt(keys, values, self.budget, room=self._deferring(executor))
        prompt = (queries, keys) if self.selector.needs_prompt_queries else (None, None)
        self.executor = executor
        self._run_job(self._build, mid_k, mid_v, prompt, self.kv.sink_k.shape[2])
        self.seq_len, self.prefilled = T, True

    def extend(self, query, key, value, *, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """A multi-token forward after the prefill (the next chunk of a streamed prefill, a continued prompt):
        exact attention over the layer's tokens and the chunk, then the chunk joins the layer. query
        ``[B, Hq, L, D]``, key/value ``[B, Hkv, L, D]`` -> ``[B, L, Hq, D]``. See ``kvpolicy.streamed_prefill``."""
        from kvpolicy.streamed_prefill import extend

        return extend(self, query, key, value, scaling=scaling, softcap=softcap)

    def _build(self, mid_k, mid_v, prompt, n_sink: int) -> None:
        """Index build, CPU pool write, slot setup and ``Selector.prepare`` (see ``prefill``)."""
        t0 = time.perf_counter()
        B, H, _, D = mid_k.shape
        S = self.budget.page_size
        layout = self.index.build(mid_k, page_size=S)
        t1 = time.perf_counter()
        # sized after the build (semantic indexes make more pages than T/S); later pages append chunks (no copy)
        P = int(layout.num_pages.max()) if layout.num_pages.numel() else 0
        kv = self.kv
        kv.cpu_pool = PagePool(B, H, S, D, dtype=mid_k.dtype, device="cpu", capacity=P,
                               pool_dtype=self.policy.cpu_pool_dtype)
        ta = time.perf_counter()
        self.stats.pool_alloc_s += ta - t1
        kv.cpu_pool.write(layout, mid_k, mid_v, base=0)
        self.index.attach_pool(kv.cpu_pool)  # an index may read its keys there from now on (Index.attach_pool)
        kv.max_pages = P
        self._built_tokens = mid_k.shape[2]
        t2 = time.perf_counter()
        retrieved = self.budget.retrieved_pages  # an unlimited budget: every page (the working set grows later)
        kv.setup_slots(self.allocator, P if retrieved is None else self.selector.max_pages_per_head(retrieved))
        ctx = dataclasses.replace(self.context(), prompt_queries=prompt[0], prompt_keys=prompt[1], index_offset=n_sink)
        self.selector.prepare(mid_k, layout, ctx)
        st = self.stats
        st.build_s += time.perf_counter() - t0
        st.build_index_s += t1 - t0  # the index alone (the pool's allocation is pool_alloc_s)
        st.build_pool_s += t2 - ta  # the pool write

    def _rebuild_if_outgrown(self) -> None:
        """In a streamed prompt's insertion job: if the index ``prefers_full_build`` and now holds more than twice
        the tokens of its last build, build it again over all of them, read back from the CPU pool (a new pool in
        the new pages, new slots, ``Selector.prepare`` again). A prompt streamed in chunks is then indexed as a
        one-shot prefill would be, up to the last doubling: the structure chosen at build (the DCI tree's centres)
        covers at least half of the tokens, and the builds cost at most twice the last one. Decode-time
        insertions never rebuild (the paper's incremental insertion)."""
        n = self.index.num_tokens
        if not self.index.prefers_full_build or n <= 2 * self._built_tokens:
            return
        (B, H, D), pool = self.shape, self.kv.cpu_pool
        rows = torch.arange(B * H).repeat_interleave(n)
        toks = torch.arange(n).repeat(B * H)
        k, v = (pool.read_tokens(rows, toks, name).to(self.device, self.dtype).view(B, H, n, D) for name in "kv")
        self._build(k, v, (None, None), self.kv.sink_k.shape[2])
        self.stats.rebuilds += 1

    # ------------------------------------------------------------------ background jobs
    def _run_job(self, fn, *args, ranked: bool = False) -> None:
        """Run ``fn(*args)`` inline, or on ``self.executor`` (one worker thread, FIFO across layers) while the
        caller goes on. The job sees the caller's grad/inference mode; on CUDA it runs on the layer's own stream,
        ordered after the work already queued on the current stream. At most one job per layer is in flight:
        ``wait_ready`` (called first by every operation that reads the layer's state) joins it."""
        if self.executor is None:
            fn(*args)
            return
        self.wait_ready()
        stream = ready = None
        if self.device.type == "cuda":
            if self._stream is None:  # high priority: its many small kernels (and the host reads that wait for
                # them) go ahead of the long prefill attention kernels queued meanwhile on the current stream
                self._stream = torch.cuda.Stream(device=self.device, priority=-1)
            stream, ready = self._stream, torch.cuda.current_stream(self.device).record_event()
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())  # thread-local: carry them over
        self._job_inputs = args  # kept alive until the current stream has waited for the job
        self._step_done = None  # `ready` orders the job after everything queued so far
        self._job_ran = False  # set by the job under the state lock (its future is marked done only later)
        submit_ranked = getattr(self.executor, "submit_ranked", None)
        if ranked and submit_ranked is not None and self.cursor is not None:
            cursor, layer = self.cursor, self.layer_idx
            self._job = submit_ranked(lambda: cursor.slack(layer), self._in_job, fn, args, stream, ready, modes)
        else:
            self._job = self.executor.submit(self._in_job, fn, args, stream, ready, modes)

    def _in_job(self, fn, args, stream, ready, modes) -> None:
        inference, grad = modes
        with (
            self._state_lock,  # first (then capture_lock, as on the decode path): a step beside it waits, or it
            # waits for that step; the layer's state is never read and written at once
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
        ):
            if ready is not None:
                stream.wait_event(ready)
            if self._step_done is not None:  # after the device work of the steps that ran while this job waited
                stream.wait_event(self._step_done)
            try:
                with capture_lock:  # never overlaps a CUDA-graph capture on the decode path
                    fn(*args)
            finally:
                self._job_ran = True

    def wait_ready(self) -> None:
        """Join the layer's background job (re-raising its error) and order the current stream after it."""
        job, self._job = self._job, None
        if job is None:
            return
        t0 = time.perf_counter()
        try:
            job.result()
        finally:
            if self._stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._job_inputs = None
            self.stats.wait_s += time.perf_counter() - t0

    def _deferring(self, executor: Executor | None) -> bool:
        return self.defer_insert and executor is not None and self.index.supports_add

    def _settle(self) -> bool:
        """Before a step: join the layer's job, or leave a queued insertion queued (the page in transit stays in
        the window). Returns True if this step holds the state lock (``_release_state_lock`` after the step)."""
        kv = self.kv
        if not kv.in_transit:
            self.wait_ready()
            return False
        job = self._job
        if job is not None and not job.done() and kv.win_len < kv.win_k.shape[2]:
            if self._state_lock.acquire(blocking=False):
                if not self._job_ran:  # the job has not started: it waits for this step
                    self.stats.deferred_steps += 1
                    return True
                self._state_lock.release()  # it ran between done() and the lock
        self.wait_ready()  # done, running, or no room left for this step's token
        kv.shift_window()
        return False

    def _release_state_lock(self, locked: bool) -> None:
        if not locked:
            return
        if self.device.type == "cuda":
            self._step_done = torch.cuda.current_stream(self.device).record_event()
        self._state_lock.release()

    def step_context(self, scaling: float, prev_selection: Selection | None, seq_len: int) -> SelectContext:
        """The context of a decode step over ``seq_len`` tokens. Its budget is the policy's, or unlimited while the
        context fits in it (then every page is attended, as the whole cache would be; counted in
        ``stats.covered_steps``). Builds, insertions and ``Selector.prepare`` see the policy's own budget
        (``context``)."""
        bt, budget = self.budget.tokens, self.budget
        if bt is not None and seq_len <= bt:
            budget = dataclasses.replace(budget, retrieved_pages=None)
        return dataclasses.replace(self.context(scaling, prev_selection), seq_len=seq_len, budget=budget)

    def context(self, scaling: float = 1.0, prev_selection: Selection | None = None) -> SelectContext:
        return SelectContext(
            layer=self.layer_idx,
            step=self.step,
            budget=self.budget,
            seq_len=self.seq_len,
            index=self.index,
            pool=self.kv.cpu_pool,
            num_pages=self.index.num_pages,
            num_kv_heads=self.shape[1],
            scaling=scaling,
            prev_selection=prev_selection,
            search_params=self.policy.search_params,
            max_pages=self.kv.max_pages,
        )

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        query: torch.Tensor,  # [B, Hq, D] the current token's query (RoPE applied)
        key: torch.Tensor,  # [B, Hkv, 1, D]
        value: torch.Tensor,  # [B, Hkv, 1, D]
        *,
        scaling: float,
        softcap: float | None = None,
        prev_selection: Selection | None = None,
    ) -> torch.Tensor:  # [B, Hq, D]
        """One decode step: append the token, run ``kvpolicy.step.decode_step`` (eagerly, on the pages a prefetch
        loaded, or as a CUDA-graph replay), then maybe move a full window page out (``_end_step``)."""
        if not self.prefilled:
            raise RuntimeError(f"layer {self.layer_idx}: decode before prefill")
        check_query(self, query)
        B, H, D = self.shape
        if key.shape != (B, H, 1, D) or value.shape != (B, H, 1, D):
            raise ValueError(f"key/value must be [B={B}, Hkv={H}, 1, D={D}], got {tuple(key.shape)}")
        if key.dtype != self.dtype or value.dtype != self.dtype:
            raise TypeError(f"layer {self.layer_idx}: key/value must be {self.dtype} like the prefilled K/V, got "
                            f"{key.dtype}/{value.dtype}" + _INT_HINT * (not key.is_floating_point()))
        if self.cursor is not None:
            self.cursor.layer = self.layer_idx
        locked = self._settle()
        try:
            self.kv.append(key, value)
            self.seq_len += 1
            clock = self._clock()
            ctx = self.step_context(scaling, prev_selection, self.seq_len)
            if ctx.budget is not self.budget:
                self.stats.covered_steps += 1
            graph_key = capture_key(self, ctx, query, scaling, softcap) if self.cuda_graphs else None
            if graph_key is not None:  # the whole device step is one replay (its time is counted as attention)
                out, sel = self.graphs.replay(
                    graph_key, lambda q, n: decode_step(self, q, n, ctx=ctx, scaling=scaling, softcap=softcap),
                    query, self.kv.win_len, on_capture=lambda: device_counters(self.stats, self.device))
                clock.lap("attention_s")
            else:
                ahead = self._take_ahead()
                if ahead is not None:  # selected and loading since prefetch(), before this step
                    self.stats.prefetched_steps += 1
                out, sel = decode_step(self, query, ctx=ctx, scaling=scaling, softcap=softcap, loaded=ahead,
                                       clock=clock)
            self._end_step(sel, clock)
            return out
        finally:
            self._release_state_lock(locked)

    def _clock(self) -> Clock:
        return Clock(self.stats, self.device if self.sync_timing and self.device.type == "cuda" else None)

    def _end_step(self, sel: Selection, clock: Clock) -> None:
        """After the attention: keep the selection, move a full window page out (``insert_s``), count the step."""
        self.last_selection = sel
        if self.kv.win_len >= self.budget.window_tokens and not self.kv.in_transit:
            self._flush_window_page()
        clock.lap("insert_s")
        self.step += 1
        self.stats.steps += 1

    # ------------------------------------------------------------------ prefetch (selection ahead of the step)
    def prefetch(
        self,
        query: torch.Tensor | None = None,  # [B, Hq, D] an estimate of the next step's query, or None
        *,
        prev_selection: Selection | None = None,
        scaling: float = 1.0,
    ) -> bool:
        """Select, reserve and start loading the pages of this layer's next decode step now, before the step
        runs, so that the copy overlaps the work in between (e.g. the rest of an earlier layer). The next
        ``decode`` then uses this selection instead of selecting with its own query, and only waits for the copy.

        Two callers (``KVPolicyCache(prefetch=...)``): a layer that follows another (``Selector.follows_layer``)
        gets the selection it will be handed (``prev_selection``) as soon as that layer has selected, so its
        step is unchanged, only earlier; any layer may get an estimate of its query (IceCache's next-layer
        estimate), and then selects with the estimate (an approximation). On CUDA the work runs on a side
        stream that waits for the current one; the step waits for it by an event. Skipped (returns False)
        where the step would not use it: before prefill, with an empty index, or with CUDA-graph steps on (a
        captured step carries its own copy). A prefetch that the next step does not use (a later call, an
        error in between) is dropped and its slots released."""
        if not self.prefilled or self.cuda_graphs:
            return False
        if query is not None:
            check_query(self, query)  # before anything changes: a bad query leaves the earlier prefetch in place
        self._drop_ahead()
        if self.kv.in_transit:  # layers that prefetch never defer their insertions (see KVPolicyCache)
            raise RuntimeError(f"layer {self.layer_idx}: prefetch while an insertion is deferred")
        self.wait_ready()  # the step would join the layer's job too
        if not self.index.num_tokens:
            return False
        ctx = self.step_context(scaling, prev_selection, self.seq_len + 1)
        stream = event = None
        if self.device.type == "cuda":
            if self._ahead_stream is None:
                self._ahead_stream = torch.cuda.Stream(device=self.device)
            stream = self._ahead_stream
            # kernels on this stream come after everything queued so far, in particular after the main stream's
            # last reads of memory that this stream's allocations may reuse (see Loaded.release)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        clock = self._clock()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            loaded = select_reserve_load(self, query, ctx, clock)
            if stream is not None:
                event = stream.record_event()
        clock.lap("transfer_s")
        self._ahead = dataclasses.replace(loaded, step=self.step, event=event)
        return True

    def _take_ahead(self) -> Loaded | None:
        """The pages a prefetch loaded for this step, or None (one made for another step is released)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.step != self.step:
            ahead.release(self)
            return None
        return ahead

    def _drop_ahead(self) -> None:
        ahead = self._take_ahead()
        if ahead is not None:
            ahead.release(self)

    # ------------------------------------------------------------------ window pages into the index
    def _flush_window_page(self) -> None:
        """Move the oldest full window page into the index and the CPU pool. The window shift happens now; the
        insertion (``Index.add``, pool write, residency invalidation, ``Selector.update``) is a job that runs
        inline or in the background until this layer's next step (see ``_run_job``)."""
        if not self.index.supports_add:
            raise NotImplementedError(
                f"index {self.index.name!r} does not support add(), so decoding past the window cannot "
                "offload new pages; choose an index with supports_add"
            )
        pk, pv = self.kv.oldest_page()  # [B, Hkv, S, D], in transit from now on
        deferred = self._deferring(self.executor)
        self._run_job(self._insert, pk, pv, ranked=deferred)
        if not deferred:
            self.kv.shift_window()

    def _insert(self, pk: torch.Tensor, pv: torch.Tensor) -> None:
        """Insert whole pages ``pk``/``pv`` ``[B, Hkv, n, D]`` (n a multiple of S) into the index and the pool."""
        t0 = time.perf_counter()
        kv = self.kv
        base = self.index.num_tokens
        layout = self.index.add(pk)
        self.last_add_layout = layout
        kv.cpu_pool.write(layout, pk, pv, base=base)
        kv.max_pages = int(self.index.num_pages.max())  # in the job: the decode path never reads it back
        self.allocator.ensure_pages(kv.cpu_pool.capacity)
        self.allocator.invalidate(layout.page_ids)
        self.selector.update(pk, layout, self.context())
        self.stats.pages_inserted += pk.shape[2] // self.budget.page_size
        self.stats.insert_work_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict[str, int]:
        """Bytes (``MEMORY_KEYS``): KV on the compute device (sink, window, slots), KV in CPU pages, index
        metadata and how much of it lives on the compute device (an index searching there may hold keys of its
        own), the selector's state (page digests, codebooks) and how much of it lives there."""
        if not self.prefilled:
            return dict.fromkeys(MEMORY_KEYS, 0)
        self.wait_ready()
        idx = self.index.nbytes
        on_dev = self.device.type != "cpu" and torch.device(self.index.device).type == self.device.type
        return {"device_kv": self.kv.device_nbytes, "cpu_kv": self.kv.cpu_pool.kv_nbytes, "index": idx,
                "index_on_device": self.index.device_nbytes if on_dev else 0,
                "selector": self.selector.nbytes,
                "selector_on_device": self.selector.device_nbytes if self.device.type != "cpu" else 0}
