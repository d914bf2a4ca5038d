"""The decode step of one policy layer, written once: select -> reserve -> load -> attend -> release.

Every decode step of a ``PolicyLayer`` runs ``decode_step``; three callers differ only in how:

* eager (``PolicyLayer.decode``): ``decode_step`` with the window's valid tokens as views;
* prefetch (``PolicyLayer.prefetch``): ``select_reserve_load`` ahead of the step, on a side stream; the step then
  runs ``decode_step(loaded=...)``, which orders itself after that work and attends;
* captured (``PolicyLayer.cuda_graphs``): ``decode_step`` over the whole window buffer with its valid length as a
  device tensor (fixed shapes), recorded once into a CUDA graph (``kvpolicy.concurrency.GraphCache``) and replayed
  while ``capture_key`` holds. ``tests/test_captured_step.py`` runs that formulation eagerly on the CPU.

Contracts of the phases (B batch, Hq query heads, Hkv KV heads, D head dim, K pages selected):

* select: ``Selector.select(query [B, Hq, D], ctx)`` -> ``Selection`` ``[B, Hkv, K]`` page ids (PAD = -1), within
  ``ctx.budget`` (checked in validate mode); an empty index selects nothing.
* reserve: ``PageAllocator.reserve`` maps the pages to slots of ``LayerKV.gpu_pool``, keeping resident pages, and
  pins the slots until ``release``; ``missing`` says which pages must be loaded. An unlimited budget grows the slot
  pool first when the selection is wider than it.
* load: ``Transfer.submit`` starts copying the missing pages from ``cpu_pool`` into their slots; ``Transfer.wait``
  orders the current stream after the copies.
* attend: ``decode_attention`` over [sink | selected slots | window] in one softmax -> ``[B, Hq, D]``.
* release, then count: ``LayerStats`` ``pages_selected``/``pages_moved``/``bytes_moved`` grow by tensors (never
  read back from the device; a capture first makes them device tensors, ``device_counters``).

The window is the layer's business on both sides of the step: ``PolicyLayer.decode`` appends the new token before
it, and moves a full window page into the index and the CPU pool after it (``PolicyLayer._end_step``). The step
requires a prefilled layer whose background job has been joined (or, with deferred insertion, whose queued job
waits for the step: ``PolicyLayer._settle``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.attention import decode_attention
from kvpolicy.ops import storage_key
from kvpolicy.types import PAD, Reservation, SelectContext, Selection, TransferHandle

if TYPE_CHECKING:  # pragma: no cover
    from kvpolicy.layer import LayerStats, PolicyLayer

__all__ = ["Clock", "Loaded", "capture_key", "check_query", "decode_step", "device_counters", "select_reserve_load"]


class Clock:
    """Wall time of a step's phases, added to ``LayerStats`` fields lap by lap. With ``sync_device`` the device is
    synchronised at each lap, so the laps are device times (benchmark breakdowns)."""

    def __init__(self, stats: LayerStats, sync_device: torch.device | None = None):
        self.stats, self.sync_device = stats, sync_device
        self.t = self._now()

    def _now(self) -> float:
        if self.sync_device is not None:
            torch.cuda.synchronize(self.sync_device)
        return time.perf_counter()

    def lap(self, field: str) -> None:
        t = self._now()
        setattr(self.stats, field, getattr(self.stats, field) + t - self.t)
        self.t = t


@dataclass(slots=True)  # made at every step: a light one
class Loaded:
    """A selection with its slots reserved and its missing pages on their way (``select_reserve_load``)."""

    selection: Selection
    reservation: Reservation
    handle: TransferHandle
    step: int = -1  # the decode step it was made for (prefetch)
    event: Any = None  # CUDA event after the work, when it ran on a side stream (prefetch)

    def release(self, layer: PolicyLayer) -> None:
        """Free the slots of a load that no step will use. The copy may still be in flight into them: the current
        stream waits for it first, so a later step cannot overwrite or read them before it lands. (A prefetch's
        tensors were allocated on its side stream; the next prefetch waits for the current stream before reusing
        their memory.)"""
        if self.event is not None:
            torch.cuda.current_stream(layer.device).wait_event(self.event)
        layer.allocator.release(self.reservation)


def check_query(layer: PolicyLayer, query: torch.Tensor) -> None:
    """Raise unless ``query`` is a floating ``[B, Hq, D]`` of the layer's shape (and finite, in validate mode)."""
    B, H, D = layer.shape
    if query.dim() != 3 or query.shape[0] != B or query.shape[2] != D or query.shape[1] % H:
        raise ValueError(f"query must be [B={B}, Hq (multiple of {H}), D={D}], got {tuple(query.shape)}")
    if not query.is_floating_point():
        raise TypeError(f"layer {layer.layer_idx}: the query must be a floating tensor, got {query.dtype}")
    if layer.validate:  # a data-dependent check (it reads back from the device): validate mode only
        bad = (~torch.isfinite(query)).any(-1)  # [B, Hq]
        if bool(bad.any()):
            b, h = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"layer {layer.layer_idx}: the decode query of head {h} (batch row {b}) holds NaN or "
                             f"inf ({int(bad.sum())} of {bad.numel()} heads); check the model's activations")


def _select(layer: PolicyLayer, query: torch.Tensor | None, ctx: SelectContext) -> Selection:
    if not layer.index.num_tokens:
        B, H, _ = layer.shape
        return Selection(page_ids=torch.full((B, H, 0), PAD, dtype=torch.int64))
    sel = layer.selector.select(query, ctx)
    if layer.validate:
        sel.validate(ctx.num_pages)
        cap = layer.selector.max_pages_per_head(ctx.k)
        if sel.k > cap:
            raise ValueError(f"selector {layer.selector.name!r} returned {sel.k} pages > budget {cap} per head")
        row = int(sel.valid.sum((1, 2)).max()) if sel.page_ids.numel() else 0
        if row > ctx.k * layer.shape[1]:
            raise ValueError(f"selector {layer.selector.name!r} returned {row} pages in a batch row > budget "
                             f"{ctx.k} x {layer.shape[1]} KV heads")
    return sel


def select_reserve_load(layer: PolicyLayer, query: torch.Tensor | None, ctx: SelectContext,
                        clock: Clock | None = None) -> Loaded:
    """Select (``select_s``), reserve slots and start loading the missing pages (``wait`` in ``decode_step``)."""
    sel = _select(layer, query, ctx)
    if clock is not None:
        clock.lap("select_s")
    kv, alloc = layer.kv, layer.allocator
    if sel.k > alloc.num_slots:  # unlimited budget: grow the working set
        kv.setup_slots(alloc, max(sel.k, 2 * alloc.num_slots))
    res = alloc.reserve(sel)
    handle = layer.transfer.submit(kv.cpu_pool, torch.where(res.missing, res.page_ids, PAD), kv.gpu_pool, res.slots)
    return Loaded(sel, res, handle)


def decode_step(layer: PolicyLayer, query: torch.Tensor, win_len: torch.Tensor | None = None, *,
                ctx: SelectContext, scaling: float, softcap: float | None, loaded: Loaded | None = None,
                clock: Clock | None = None) -> tuple[torch.Tensor, Selection]:
    """One step (module docstring): query ``[B, Hq, D]`` -> (attention output ``[B, Hq, D]``, the selection).

    ``loaded``: the step's pages, selected and loading already (prefetch). ``win_len``: None attends the window's
    valid tokens as views; a 0-dim device tensor attends the whole window buffer masked by it (fixed shapes, the
    captured step). ``clock`` laps ``select_s``, ``transfer_s`` (reserve, submit and wait) and ``attention_s``."""
    if loaded is None:
        loaded = select_reserve_load(layer, query, ctx, clock)
    elif loaded.event is not None:
        torch.cuda.current_stream(layer.device).wait_event(loaded.event)
    sel, res, handle = loaded.selection, loaded.reservation, loaded.handle
    layer.transfer.wait(handle)
    if clock is not None:
        clock.lap("transfer_s")
    kv = layer.kv
    win_k, win_v = kv.window() if win_len is None else (kv.win_k, kv.win_v)
    gp = kv.gpu_pool
    out = decode_attention(query, kv.sink_k, kv.sink_v, gp.k, gp.v, gp.lengths, res.slots.to(layer.device), win_k,
                           win_v, scaling, softcap, win_len=win_len)
    layer.allocator.release(res)
    st = layer.stats
    st.pages_selected += (sel.page_ids >= 0).sum()  # tensors: counted without reading back from the device
    st.pages_moved += handle.num_pages
    st.bytes_moved += handle.nbytes
    if clock is not None:
        clock.lap("attention_s")
    return out, sel


def capture_key(layer: PolicyLayer, ctx: SelectContext, query: torch.Tensor, scaling: float, softcap) -> tuple | None:
    """What a captured step depends on, or None if this step must run eagerly (CPU, checks or phase timing on,
    empty index, sink still filling, unlimited budget, or a part that cannot be captured)."""
    kv = layer.kv
    if (layer.device.type != "cuda" or layer.validate or layer.sync_timing or not layer.index.num_tokens
            or ctx.budget.retrieved_pages is None or not kv.sink_full):
        return None
    parts = (layer.selector.capture_key(ctx), layer.allocator.capture_key(),
             layer.transfer.capture_key(kv.cpu_pool, kv.gpu_pool))
    if any(p is None for p in parts):
        return None
    return parts + storage_key(kv.sink_k, kv.sink_v, kv.win_k, kv.win_v) + (
        tuple(query.shape), query.dtype, float(scaling), softcap, id(layer.stats))


def device_counters(stats: LayerStats, device: torch.device) -> Callable[[], None]:
    """Before a capture: make the counters a step adds to int64 device tensors, so that the captured adds
    accumulate in place. -> a callable to run after the warm-up: the warm-up really reserves and loads the step's
    pages (the replay then finds them resident), so its moves count but its selection does not."""
    for f in ("pages_selected", "pages_moved", "bytes_moved"):
        v = getattr(stats, f)
        if not (isinstance(v, torch.Tensor) and v.device == device and v.dtype == torch.int64 and v.dim() == 0):
            setattr(stats, f, torch.as_tensor(v, device=device).to(torch.int64).reshape(()).clone())
    selected = stats.pages_selected.clone()
    return lambda: stats.pages_selected.copy_(selected)
