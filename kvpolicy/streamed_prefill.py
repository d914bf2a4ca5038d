"""A multi-token forward on a layer that already holds tokens: the next chunk of a streamed prefill, or a
continued prompt (a chat's next turn). Both are one operation, ``extend``.

The chunk's queries attend exactly to every earlier token of the layer and causally to the chunk itself:

* the sink and the window, on the GPU, as one piece;
* the pages of the CPU pool, ``BLOCK_TOKENS`` per (b, head) at a time (a block never spans two of the pool's
  chunks): on CUDA each block is copied from the pinned pool on a side stream while the previous block is
  attended (double buffering), so the GPU holds at most two blocks of the past, never the whole layer; an fp8
  pool's blocks cross as fp8 and are dequantised on the GPU;
* the chunk's own K/V, causally;

merged exactly by their log-sum-exp (``kvpolicy.chunk_attention``). The chunk's K/V then join the layer as the
decode path's tokens do: the window takes the newest, whole pages before it go to the index (``Index.add``) and
the pool in one insertion job (in the background with ``overlap``), the sink fills first if it is short. An index
that ``prefers_full_build`` (the DCI tree, whose centres are fixed at build) is built again in that job, from the
pool's tokens, whenever it holds more than twice the tokens of its last build (``PolicyLayer._rebuild_if_outgrown``).
"""

from __future__ import annotations

import torch

from kvpolicy.chunk_attention import partial_attention
from kvpolicy.pool_dtype import dequantize

__all__ = ["BLOCK_TOKENS", "check_extend", "extend"]

BLOCK_TOKENS = 32768  # pool tokens per (b, head) per streamed block: 64 MiB of K per block at Hkv=8, D=128, bf16


def check_extend(layer, key: torch.Tensor) -> None:
    """Raise (before any state changes) unless ``layer`` can take a multi-token forward of ``key``."""
    name = f"layer {layer.layer_idx}"
    if not layer.prefilled:
        raise RuntimeError(f"{name}: a continued prompt before the first prefill")
    if not layer.index.supports_add:
        raise ValueError(
            f"{name}: index {layer.index.name!r} cannot add pages, so this cache cannot take a continued prompt or a "
            "streamed prefill; use prefill_chunk=None (one-shot prefill) or an index with supports_add"
        )
    if layer.selector.needs_prompt_queries:
        raise ValueError(
            f"{name}: selector {layer.selector.name!r} scores the whole prompt's queries at prefill, so this cache "
            "cannot take a continued prompt or a streamed prefill; use prefill_chunk=None (one-shot prefill)"
        )
    B, H, D = layer.shape
    if key.dim() != 4 or key.shape[0] != B or key.shape[1] != H or key.shape[3] != D:
        raise ValueError(f"{name}: chunk keys must be [B={B}, Hkv={H}, n, D={D}], got {tuple(key.shape)}")


def _pool_blocks(layer):
    """Yield ``(k, v, valid)`` of the pool's pages in use, ``BLOCK_TOKENS`` per (b, head) at a time (and never
    across a chunk of the pool), on the layer's device in its dtype (an fp8 pool is dequantised there): k/v
    ``[B, Hkv, n, D]``, valid ``[B, Hkv, n]``."""
    pool, S = layer.kv.cpu_pool, layer.budget.page_size
    P = layer.kv.max_pages  # pages of the fullest row (rows with fewer pages have length 0 there)
    if pool is None or P == 0:
        return
    step = max(1, BLOCK_TOKENS // S)
    bounds = []  # [p0, p1) of each block: `step` pages at most, within one chunk
    for c, a, b in pool.spans(0, P):
        base = c * pool.chunk_pages
        bounds += [(base + q, base + min(b, q + step)) for q in range(a, b, step)]
    B, H, D, dev, dtype = pool.batch_size, pool.num_kv_heads, pool.head_dim, layer.device, layer.dtype

    def flat(k, v, lengths, full: bool):
        n = k.shape[2]
        if full:  # every page of the block is whole (positional pages): no mask, the fastest kernel
            return k.reshape(B, H, n * S, D), v.reshape(B, H, n * S, D), None
        valid = torch.arange(S, device=lengths.device) < lengths.unsqueeze(-1)  # [B, H, n, S]
        return k.reshape(B, H, n * S, D), v.reshape(B, H, n * S, D), valid.reshape(B, H, n * S)

    # which blocks hold only whole pages: read on the host from the (pinned) lengths, without a device sync
    whole = [bool((pool.lengths[:, :, p0:p1] == S).all()) for p0, p1 in bounds]

    if dev.type != "cuda":  # the pool is where the attention runs: views (copies only to dequantise)
        for (p0, p1), full in zip(bounds, whole):
            k, v = pool.read_range(p0, p1, dtype=dtype)
            yield flat(k, v, pool.lengths[:, :, p0:p1], full)
        return
    main = torch.cuda.current_stream(dev)
    side = layer._prefill_stream
    if side is None:
        side = layer._prefill_stream = torch.cuda.Stream(device=dev)
    # two staging buffers, filled in turn: a block is copied into one while the other is attended. The side stream
    # waits for the attention that last read a buffer before overwriting it; nothing is allocated per block, so
    # the GPU holds two blocks of the past however far the host runs ahead (an fp8 pool's blocks cross as fp8 with
    # their scales, and each is dequantised on the main stream when it is attended: one more block in flight)
    n = min(step, max(p1 - p0 for p0, p1 in bounds))
    fp8 = pool.fp8

    def buffer():
        kv = [torch.empty((B, H, n, S, D), dtype=pool.storage_dtype, device=dev) for _ in range(2)]
        meta = [torch.empty((B, H, n), dtype=pool.lengths.dtype, device=dev)]
        meta += [torch.empty((B, H, n), dtype=torch.float32, device=dev) for _ in range(2 if fp8 else 0)]
        return kv + meta

    bufs = [buffer() for _ in range(min(2, len(bounds)))]
    freed: list = [None] * len(bufs)  # event on the main stream after the last read of each buffer
    side.wait_stream(main)  # the buffers were allocated on the main stream

    def load(i):
        (p0, p1), slot = bounds[i], i % len(bufs)
        k, v, lengths, *scales = bufs[slot]
        src_k, src_v, src_ks, src_vs = pool.raw_range(p0, p1)
        with torch.cuda.stream(side):
            if freed[slot] is not None:
                side.wait_event(freed[slot])
            m = p1 - p0
            for b in range(B):  # each (b, head) row of a pinned chunk is contiguous: one async copy per row
                for h in range(H):
                    k[b, h, :m].copy_(src_k[b, h], non_blocking=True)
                    v[b, h, :m].copy_(src_v[b, h], non_blocking=True)
            lengths[:, :, :m].copy_(pool.lengths[:, :, p0:p1], non_blocking=True)
            for dst, src in zip(scales, (src_ks, src_vs)):
                dst[:, :, :m].copy_(src, non_blocking=True)
            scales = [t[:, :, :m] for t in scales] or [None, None]
            return k[:, :, :m], v[:, :, :m], lengths[:, :, :m], scales, side.record_event()

    nxt = load(0)
    for i in range(len(bounds)):
        k, v, lengths, (ks, vs), ready = nxt
        main.wait_event(ready)
        if fp8 or k.dtype != dtype:
            k, v = dequantize(k, ks, dtype), dequantize(v, vs, dtype)
        yield flat(k, v, lengths, whole[i])  # the caller queues this block's attention before asking for the next
        freed[i % len(bufs)] = main.record_event()
        nxt = load(i + 1) if i + 1 < len(bounds) else None
    for buf in bufs:  # the last reads are queued on the main stream; the side stream's copies are done
        for t in buf:
            t.record_stream(side)


def _attend(layer, query, key, value, scaling: float, softcap) -> torch.Tensor:
    """query [B, Hq, L, D], key/value [B, Hkv, L, D] -> [B, L, Hq, D] in the query's dtype."""
    acc = partial_attention(query, key, value, scale=scaling, causal=True, softcap=softcap)
    kv = layer.kv
    win_k, win_v = kv.window()
    near_k, near_v = torch.cat([kv.sink_k, win_k], dim=2), torch.cat([kv.sink_v, win_v], dim=2)
    acc = acc.merge(partial_attention(query, near_k, near_v, scale=scaling, softcap=softcap))
    for k, v, valid in _pool_blocks(layer):
        acc = acc.merge(partial_attention(query, k, v, scale=scaling, valid=valid, softcap=softcap))
    return acc.output(query.dtype)


def _insert_after(layer, copies_done, k: torch.Tensor, v: torch.Tensor) -> None:
    """The insertion job, once the streamed block copies that read the pinned pool are done (the job writes the
    pool on the host, which no CUDA stream order protects)."""
    if copies_done is not None:
        copies_done.synchronize()
    layer._insert(k, v)
    layer._rebuild_if_outgrown()  # an index built on the first chunks only is built again (PolicyLayer)


def _absorb(layer, key: torch.Tensor, value: torch.Tensor) -> None:
    """Append the chunk's K/V [B, Hkv, L, D] (``LayerKV.absorb``); whole pages that leave the window go to the
    index and the pool in one insertion job."""
    mid_k, mid_v = layer.kv.absorb(key, value)
    layer.seq_len += key.shape[2]
    if mid_k.shape[2]:
        side = layer._prefill_stream
        copies_done = side.record_event() if side is not None else None
        layer._run_job(_insert_after, layer, copies_done, mid_k.contiguous(), mid_v.contiguous())


def extend(layer, query, key, value, *, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """The chunk's attention output ``[B, L, Hq, D]``; then the chunk joins the layer (module docstring).
    query ``[B, Hq, L, D]`` (RoPE applied), key/value ``[B, Hkv, L, D]``."""
    check_extend(layer, key)
    if query.dim() != 4 or query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]:
        raise ValueError(f"layer {layer.layer_idx}: query {tuple(query.shape)} does not match keys {tuple(key.shape)}")
    layer._drop_ahead()
    layer.wait_ready()  # the pool and the index hold every earlier page
    if layer.kv.in_transit:  # a deferred insertion was joined: its page leaves the window now
        layer.kv.shift_window()
    layer.stats.prompt_chunks += 1
    out = _attend(layer, query, key, value, scaling, softcap)
    _absorb(layer, key, value)
    return out
