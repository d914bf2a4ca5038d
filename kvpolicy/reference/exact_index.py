"""``exact``: positional pages scored by exact maximum inner product."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Index
from kvpolicy.ops import GQA_MERGES, check_tensor, rank_group_pages, storage_key, triton_available
from kvpolicy.types import PAD, PageLayout, SearchParams, Selection

__all__ = ["ExactIndex"]


@dataclass(kw_only=True)
class ExactIndex(Index):
    """Pages are consecutive runs of ``S`` tokens in arrival order (page p = tokens pS .. pS+S-1).

    A page's score for a query head is the largest ``q . k`` over its tokens, computed exactly over every
    key (the index keeps a copy of the keys on ``device``); the heads of a GQA group are merged by
    interleaving their rankings (``kvpolicy.ops.gqa_merge``), or by the rule in ``SearchParams.gqa_merge``. This is the ground truth that approximate
    indexes are measured against (recall@k).

    On CUDA (with triton) ``search`` scores the pages with the fused kernel
    ``kvpolicy_kernels.page_scores.exact_page_scores`` over the key store viewed as pages of its whole capacity, with the
    valid length of each page kept on the device: fixed shapes and storage between growths, so the search is
    capturable (``capture_key``). The query is taken in the keys' dtype there (what a model produces);
    ``page_scores`` keeps the float32 torch computation.
    """

    name: ClassVar[str] = "exact"
    supports_add: ClassVar[bool] = True
    gqa_merges: ClassVar[tuple[str, ...]] = GQA_MERGES
    device: str = "cpu"

    def __post_init__(self) -> None:
        torch.device(self.device)  # raises on an unknown device string
        self.reset()

    def reset(self) -> None:
        self._keys: torch.Tensor | None = None  # [B, Hkv, Tcap, D], Tcap a multiple of the page size
        self._lens: torch.Tensor | None = None  # [B, Hkv, Tcap / S] int32 valid tokens per page (fused search)
        self._n = 0
        self._page_size = 0

    # ---------------------------------------------------------------- state
    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def num_pages(self) -> torch.Tensor:
        if self._keys is None:
            return torch.zeros((0, 0), dtype=torch.int64)
        B, H = self._keys.shape[:2]
        return torch.full((B, H), -(-self._n // self._page_size), dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        if self._keys is None:
            return 0
        return self._keys.nbytes  # the store with its headroom (what the device holds)

    # ---------------------------------------------------------------- build / add
    def _layout(self, first_page: int) -> PageLayout:
        B, H = self._keys.shape[:2]
        S, n = self._page_size, self._n
        P = -(-n // S)
        pages = torch.arange(first_page, P, dtype=torch.int64)  # [M]
        tids = pages.unsqueeze(-1) * S + torch.arange(S)  # [M, S]
        tids = torch.where(tids < n, tids, PAD)
        M = pages.numel()
        return PageLayout(
            page_ids=pages.expand(B, H, M).clone(),
            token_ids=tids.expand(B, H, M, S).clone(),
            lengths=(tids >= 0).sum(-1).to(torch.int32).expand(B, H, M).clone(),
            num_pages=torch.full((B, H), P, dtype=torch.int64),
            num_tokens=n,
        )

    def build(self, keys: torch.Tensor, *, page_size: int) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, T, D]")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        B, H, T, D = keys.shape
        # headroom for decode-time add(): the first insertions write in place instead of doubling the store
        cap = -(-(T + max(256, T // 8)) // page_size) * page_size
        self._keys = keys.new_empty((B, H, cap, D), device=self.device)
        self._keys[:, :, :T] = keys.detach()
        self._n, self._page_size = T, page_size
        self._lens = None
        self._update_lengths()
        return self._layout(0)

    def add(self, keys: torch.Tensor) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, n, D]")
        if self._keys is None:
            raise RuntimeError("ExactIndex.add() before build()")
        if keys.shape[:2] != self._keys.shape[:2] or keys.shape[-1] != self._keys.shape[-1]:
            raise ValueError(f"keys shape {tuple(keys.shape)} does not match the index {tuple(self._keys.shape)}")
        first_page = self._n // self._page_size  # the last, partial page changes too
        n_new = self._n + keys.shape[2]
        if n_new > self._keys.shape[2]:
            S = self._page_size
            cap = -(-max(n_new, 2 * self._keys.shape[2]) // S) * S
            grown = self._keys.new_empty((*self._keys.shape[:2], cap, keys.shape[-1]))
            grown[:, :, : self._n] = self._keys[:, :, : self._n]
            self._keys = grown
        self._keys[:, :, self._n : n_new] = keys.to(self._keys.device, self._keys.dtype)
        self._n = n_new
        self._update_lengths()
        return self._layout(first_page)

    def _fused(self) -> bool:
        return self._keys is not None and self._keys.is_cuda and triton_available()

    def _update_lengths(self) -> None:
        """Valid tokens of every page of the capacity, on the device, rewritten in place (fused search)."""
        if not self._fused():
            return
        B, H, cap, _ = self._keys.shape
        S = self._page_size
        lens = (self._n - torch.arange(0, cap, S, device=self._keys.device)).clamp(0, S).to(torch.int32)
        if self._lens is None or self._lens.shape[-1] != lens.numel():
            self._lens = lens.expand(B, H, -1).contiguous()
        else:
            self._lens.copy_(lens.expand(B, H, -1))

    # ---------------------------------------------------------------- search
    def _check_queries(self, queries: torch.Tensor) -> None:
        check_tensor("queries", queries, 3, dims="[B, Hq, D]")
        if self._keys is None:
            raise RuntimeError("ExactIndex.search() before build()")
        B, H, _, D = self._keys.shape
        if queries.shape[0] != B or queries.shape[-1] != D or queries.shape[1] % H:
            raise ValueError(
                f"queries shape {tuple(queries.shape)} is not [B={B}, Hq (multiple of Hkv={H}), D={D}]"
            )

    def page_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Exact page scores: queries [B, Hq, D] -> [B, Hq, P] (max q.k over each page's tokens)."""
        self._check_queries(queries)
        B, H, _, D = self._keys.shape
        G = queries.shape[1] // H
        keys = self._keys[:, :, : self._n].float()  # [B, H, T, D]
        q = queries.to(keys.device).float().view(B, H, G, D)
        scores = torch.einsum("bhgd,bhtd->bhgt", q, keys).reshape(B, H * G, self._n)  # [B, Hq, T]
        S = self._page_size
        P = -(-self._n // S)
        scores = torch.nn.functional.pad(scores, (0, P * S - self._n), value=float("-inf"))
        return scores.view(B, H * G, P, S).amax(dim=-1)  # positional pages: [B, Hq, P]

    def capture_key(self, k: int, params: SearchParams | None = None) -> tuple | None:
        """The fused search on CUDA reads the key store and the page lengths in place, in fixed shapes."""
        if not self._fused() or self._n == 0:
            return None
        return ("exact", *storage_key(self._keys, self._lens), k, self.merge_rule(params))

    def search(self, queries: torch.Tensor, k: int, *, params: SearchParams | None = None) -> Selection:
        if self._fused() and self._n:
            from kvpolicy_kernels.page_scores import exact_page_scores

            self._check_queries(queries)
            B, H, cap, D = self._keys.shape
            S = self._page_size
            pool = self._keys.view(B, H, cap // S, S, D)  # pages of the whole capacity (empty ones score -inf)
            pscores = exact_page_scores(queries.to(self._keys.device, self._keys.dtype), pool, self._lens)
        else:
            pscores = self.page_scores(queries)  # [B, Hq, P]
        B, Hq, P = pscores.shape
        H = self._keys.shape[1]
        ids, scores = rank_group_pages(pscores.view(B, H, Hq // H, P), k, self.merge_rule(params))  # [B, H, k']
        return Selection(page_ids=ids, scores=scores)
