"""``LayerKV``: the K/V one policy layer holds, in one place (B batch, Hkv KV heads, S page size, D head dim)::

    compute device (GPU):  sink   [B, Hkv, <=sink_tokens, D]       first tokens, always attended
                           window [B, Hkv, W, D], first win_len valid newest tokens, always attended
                           slots  gpu_pool [B, Hkv, N, S, D]       working set: the selected pages
    CPU (pinned if CUDA):  pool   cpu_pool, chunks [B, Hkv, Cc, S, D]  every offloaded page (the index's pages)

The window buffer holds ``window_tokens`` (whole pages), plus one page of room where insertions may be deferred
(``kvpolicy.layer``): the oldest page then stays ``in_transit``, attended from the window until its insertion is
joined. Which pages sit in which slot (residency) is the ``PageAllocator``'s; ``setup_slots`` sizes both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.pool import PagePool
from kvpolicy.types import Budget

__all__ = ["LayerKV"]


@dataclass(eq=False)
class LayerKV:
    """Sink, window, slot pool and CPU pool of one layer (module docstring)."""

    page_size: int
    sink_tokens: int  # the sink's full size; a short prompt leaves it short, and decoded tokens fill it first
    window_tokens: int  # a window this full moves its oldest page out after the step
    sink_k: torch.Tensor  # [B, Hkv, <=sink_tokens, D]
    sink_v: torch.Tensor
    win_k: torch.Tensor  # [B, Hkv, W, D] buffer, first win_len tokens valid (W >= window_tokens)
    win_v: torch.Tensor
    win_len: int = 0
    in_transit: bool = False  # the oldest window page is being inserted and is still attended from the window
    cpu_pool: PagePool | None = None  # set by the build job
    gpu_pool: PagePool | None = None  # the slots (``setup_slots``)
    max_pages: int = 0  # pages of the fullest (b, head) row of the index, known on the host (set by the jobs)

    @classmethod
    def from_prompt(cls, keys: torch.Tensor, values: torch.Tensor, budget: Budget, *, room: bool
                    ) -> tuple[LayerKV, torch.Tensor, torch.Tensor]:
        """Sink and window from the prompt's K/V ``[B, Hkv, T, D]`` (``room``: one more page of window buffer)
        -> (the state, the middle K/V that go to the index and the pool ``[B, Hkv, n_mid, D]``)."""
        B, H, T, D = keys.shape
        S = budget.page_size
        n_sink = min(T, budget.sink_tokens)
        rest = T - n_sink
        n_mid = max(0, rest // S - (budget.window_pages - 1)) * S
        W = budget.window_tokens + (S if room else 0)
        kv = cls(S, budget.sink_tokens, budget.window_tokens, keys[:, :, :n_sink].contiguous(),
                 values[:, :, :n_sink].contiguous(), keys.new_zeros((B, H, W, D)), values.new_zeros((B, H, W, D)),
                 win_len=rest - n_mid)
        kv.win_k[:, :, : kv.win_len] = keys[:, :, n_sink + n_mid :]
        kv.win_v[:, :, : kv.win_len] = values[:, :, n_sink + n_mid :]
        return kv, keys[:, :, n_sink : n_sink + n_mid], values[:, :, n_sink : n_sink + n_mid]

    @property
    def sink_full(self) -> bool:
        return self.sink_k.shape[2] >= self.sink_tokens

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid window tokens (views): ``[B, Hkv, win_len, D]`` each."""
        return self.win_k[:, :, : self.win_len], self.win_v[:, :, : self.win_len]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """One decoded token ``[B, Hkv, 1, D]``: to the sink while it is short, else to the window."""
        if not self.sink_full:
            self.sink_k = torch.cat([self.sink_k, key], dim=2)
            self.sink_v = torch.cat([self.sink_v, value], dim=2)
            return
        self.win_k[:, :, self.win_len] = key[:, :, 0]
        self.win_v[:, :, self.win_len] = value[:, :, 0]
        self.win_len += 1

    def absorb(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt chunk ``[B, Hkv, L, D]`` (``kvpolicy.streamed_prefill``): the sink fills first if short, the
        window keeps what is left after the whole pages that leave it (as in the prefill: fewer than its pages)
        -> those pages' K/V ``[B, Hkv, n_mid, D]`` (n_mid may be 0), for the index and the pool."""
        S = self.page_size
        short = self.sink_tokens - self.sink_k.shape[2]
        if short > 0:
            take = min(short, key.shape[2])
            self.sink_k = torch.cat([self.sink_k, key[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, value[:, :, :take]], dim=2)
            key, value = key[:, :, take:], value[:, :, take:]
        win_k, win_v = self.window()
        ck, cv = torch.cat([win_k, key], dim=2), torch.cat([win_v, value], dim=2)
        n = ck.shape[2]
        n_mid = max(0, n // S - (self.window_tokens // S - 1)) * S
        rest = n - n_mid
        self.win_k[:, :, :rest] = ck[:, :, n_mid:]
        self.win_v[:, :, :rest] = cv[:, :, n_mid:]
        self.win_len = rest
        return ck[:, :, :n_mid], cv[:, :, :n_mid]

    def oldest_page(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the oldest window page ``[B, Hkv, S, D]``, which is now in transit (``shift_window`` drops
        it once its insertion is joined)."""
        S = self.page_size
        self.in_transit = True
        return self.win_k[:, :, :S].clone(), self.win_v[:, :, :S].clone()

    def shift_window(self) -> None:
        """Drop the oldest window page (its insertion has been joined)."""
        S = self.page_size
        self.win_k[:, :, :-S] = self.win_k[:, :, S:].clone()
        self.win_v[:, :, :-S] = self.win_v[:, :, S:].clone()
        self.win_len -= S
        self.in_transit = False

    def setup_slots(self, allocator, n: int) -> None:
        """A slot pool of ``n`` pages per (b, head) on the sink's device, and the allocator set up over it."""
        B, H, _, D = self.sink_k.shape
        dev = self.sink_k.device
        self.gpu_pool = PagePool(B, H, self.page_size, D, dtype=self.sink_k.dtype, device=dev, capacity=n, pin=False,
                                 track_tokens=False)
        allocator.setup(B, H, n, dev)
        allocator.ensure_pages(self.cpu_pool.capacity)

    @property
    def device_nbytes(self) -> int:
        """Bytes on the compute device: sink, window buffer and slots."""
        return sum(t.nbytes for t in (self.sink_k, self.sink_v, self.win_k, self.win_v)) + self.gpu_pool.kv_nbytes
