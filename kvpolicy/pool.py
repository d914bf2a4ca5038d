"""Page pools: fixed-shape K/V page storage of one layer.

A ``PagePool`` holds pages per (batch row, KV head): ``k``/``v`` ``[B, Hkv, C, S, D]``, valid lengths
``[B, Hkv, C]`` and, for a CPU pool that backs an index, the index-local token id in every page slot plus the
inverse map (token -> page, offset), so pages whose contents change can be rewritten from the pool itself.

The CPU pool uses pinned (page-locked) memory whenever CUDA is available, so host-to-device copies can be
asynchronous. The GPU slot pool is the same class with ``track_tokens=False`` and ``capacity = N`` slots.
"""

from __future__ import annotations

import torch

from kvpolicy.host_memory import pinned_empty
from kvpolicy.types import PAD, PageLayout

__all__ = ["PagePool", "pin_by_default"]


def pin_by_default(device: torch.device | str) -> bool:
    """Pin CPU pools when a CUDA device exists (pinned memory needs a CUDA driver)."""
    return torch.device(device).type == "cpu" and torch.cuda.is_available()


def _empty(shape, dtype, device, pin: bool, fill=None) -> torch.Tensor:
    if pin and fill is None:  # the big K/V stores: page-locked in place (kvpolicy.host_memory)
        return pinned_empty(shape, dtype)
    t = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    if fill is not None:
        t.fill_(fill)
    return t


class PagePool:
    """K/V pages of one layer for every (batch row, KV head); grows by doubling when ``track_tokens``."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        page_size: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        pin: bool | None = None,
        track_tokens: bool = True,
    ):
        self.batch_size, self.num_kv_heads = batch_size, num_kv_heads
        self.page_size, self.head_dim = page_size, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.pinned = pin_by_default(self.device) if pin is None else bool(pin)
        self.track_tokens = track_tokens
        B, H, S, D = batch_size, num_kv_heads, page_size, head_dim
        C = capacity
        # a tracked pool's pages are written whole (``write`` zero-fills the unused slots of every page it
        # writes) before any id can select them, so its K/V need no zero fill (a small saving: 8 ms per 537 MB
        # on the H100 host, benchmarks/results/decode/pinned_alloc_probe_h100.json). A slot pool is zeroed
        # (cheap, on the device).
        self._kv_fill = None if track_tokens else 0
        self.k = _empty((B, H, C, S, D), dtype, self.device, self.pinned, self._kv_fill)  # [B, Hkv, C, S, D]
        self.v = _empty((B, H, C, S, D), dtype, self.device, self.pinned, self._kv_fill)  # [B, Hkv, C, S, D]
        self.lengths = _empty((B, H, C), torch.int32, self.device, self.pinned, 0)  # [B, Hkv, C] (pinned: the GPU
        # may read the pool directly, see kernels/page_load.py)
        if track_tokens:
            self.token_ids = torch.full((B, H, C, S), PAD, dtype=torch.int64, device=self.device)
            self.token_page = torch.full((B, H, 0), PAD, dtype=torch.int64, device=self.device)  # [B, Hkv, T]
            self.token_offset = torch.full((B, H, 0), PAD, dtype=torch.int64, device=self.device)  # [B, Hkv, T]

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        n = self.k.nbytes + self.v.nbytes + self.lengths.nbytes
        if self.track_tokens:
            n += self.token_ids.nbytes + self.token_page.nbytes + self.token_offset.nbytes
        return n

    @property
    def kv_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def page_nbytes(self) -> int:
        """Bytes of one page of one head, K and V together."""
        return 2 * self.page_size * self.head_dim * self.k.element_size()

    def ensure_capacity(self, pages: int) -> None:
        """Grow to hold at least ``pages`` pages per (b, head), doubling; contents are kept."""
        C = self.capacity
        if pages <= C:
            return
        new_c = max(pages, 2 * C, 4)
        B, H, S, D = self.batch_size, self.num_kv_heads, self.page_size, self.head_dim
        for name in ("k", "v"):
            old = getattr(self, name)
            new = _empty((B, H, new_c, S, D), self.dtype, self.device, self.pinned, self._kv_fill)
            new[:, :, :C] = old
            setattr(self, name, new)
        lengths = _empty((B, H, new_c), torch.int32, self.device, self.pinned, 0)
        lengths[:, :, :C] = self.lengths
        self.lengths = lengths
        if self.track_tokens:
            tids = torch.full((B, H, new_c, S), PAD, dtype=torch.int64, device=self.device)
            tids[:, :, :C] = self.token_ids
            self.token_ids = tids

    def _ensure_tokens(self, tokens: int) -> None:
        T = self.token_page.shape[-1]
        if tokens <= T:
            return
        new_t = max(tokens, 2 * T, 64)
        B, H = self.batch_size, self.num_kv_heads
        for name in ("token_page", "token_offset"):
            old = getattr(self, name)
            new = torch.full((B, H, new_t), PAD, dtype=torch.int64, device=self.device)
            new[:, :, :T] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ writes
    def write(self, layout: PageLayout, keys: torch.Tensor, values: torch.Tensor, base: int) -> None:
        """Write the pages of ``layout``.

        ``keys``/``values`` ``[B, Hkv, n, D]`` hold the tokens with index-local ids ``base .. base+n-1``;
        tokens of the layout with smaller ids are already in this pool and are moved from where they are.
        """
        if not self.track_tokens:
            raise RuntimeError("PagePool.write needs track_tokens=True (a slot pool is written by a Transfer)")
        src_dev = keys.device  # new tokens are gathered where they are (e.g. on the GPU), then moved once
        keys, values = keys.to(dtype=self.dtype), values.to(device=src_dev, dtype=self.dtype)
        n = keys.shape[2]
        pids, tids = layout.page_ids.to(self.device), layout.token_ids.to(self.device)  # [B,H,M], [B,H,M,S]
        if pids.numel() == 0:
            return
        self.ensure_capacity(int(pids.max()) + 1)
        self._ensure_tokens(base + n)
        B, H, M, S = tids.shape
        C, D, dev = self.capacity, self.head_dim, self.device
        row = (torch.arange(B, device=dev).view(B, 1, 1, 1) * H + torch.arange(H, device=dev).view(1, H, 1, 1))
        row = row.expand(B, H, M, S)  # (b, h) row of every page slot
        valid = (tids >= 0) & (pids >= 0).unsqueeze(-1)  # [B, H, M, S]
        is_new = valid & (tids >= base)
        old = valid & ~is_new  # tokens this pool already holds, moved to another page
        rows = pids >= 0  # [B, H, M]
        dst = (row[..., 0] * C + pids.clamp(min=0))[rows]  # flat page index in this pool
        # flat source row of every slot: new tokens from `keys`, older ones from where this pool holds them
        new_src = (row * n + (tids - base)).clamp(0, max(B * H * n - 1, 0))[rows].reshape(-1)
        any_old = bool(old.any())
        if any_old:
            t_old = tids.clamp(min=0, max=max(self.token_page.shape[-1] - 1, 0)).reshape(B * H, -1)
            old_page = self.token_page.reshape(B * H, -1).gather(1, t_old).reshape(B, H, M, S)
            old_off = self.token_offset.reshape(B * H, -1).gather(1, t_old).reshape(B, H, M, S)
            if bool((old & (old_page < 0)).any()):
                raise ValueError("layout moves a token that this pool never stored")
            old_src = ((row * C + old_page.clamp(min=0)) * S + old_off.clamp(min=0))[rows].reshape(-1)
        newm, keep = is_new[rows].reshape(-1, 1), valid[rows].reshape(-1, 1)
        in_order = not any_old and M <= C and bool(((pids == torch.arange(M, device=dev)) | (pids < 0)).all())
        for name, fresh in (("k", keys), ("v", values)):
            if in_order and n:  # pages 0..M-1 of every row, all new (a build): gather there, one copy per tensor
                idx = (row * n + (tids - base)).clamp(0, B * H * n - 1).reshape(-1).to(src_dev)
                g = fresh.reshape(B * H * n, D).index_select(0, idx)
                g = g.masked_fill_(~valid.reshape(-1, 1).to(src_dev), 0)
                dst_rows, src_rows = getattr(self, name).view(B * H, C, S * D), g.view(B * H, M, S * D)
                for r in range(B * H):  # contiguous row copies (a strided destination would be staged)
                    dst_rows[r, :M].copy_(src_rows[r])
                continue
            pool = getattr(self, name)
            if n:
                a = fresh.reshape(B * H * n, D).index_select(0, new_src.to(src_dev)).to(dev)  # one move
            else:
                a = torch.zeros((newm.shape[0], D), dtype=self.dtype, device=dev)
            if any_old:
                a = torch.where(newm, a, pool.reshape(B * H * C * S, D).index_select(0, old_src))
            src = a.masked_fill_(~keep, 0)  # [rows*S, D]
            pool.view(B * H * C, S * D).index_copy_(0, dst, src.view(-1, S * D))
        self.lengths.view(-1).index_copy_(0, dst, layout.lengths.to(dev)[rows].to(torch.int32))
        self.token_ids.view(B * H * C, S).index_copy_(0, dst, torch.where(valid, tids, PAD)[rows])
        T = self.token_page.shape[-1]
        tflat = (row * T + tids.clamp(min=0))[valid]
        self.token_page.view(-1).index_copy_(0, tflat, pids.unsqueeze(-1).expand(B, H, M, S)[valid])
        self.token_offset.view(-1).index_copy_(0, tflat, torch.arange(S, device=dev).expand(B, H, M, S)[valid])

    def reset(self) -> None:
        self.lengths.zero_()
        if self.track_tokens:
            self.token_ids.fill_(PAD)
            self.token_page.fill_(PAD)
            self.token_offset.fill_(PAD)
