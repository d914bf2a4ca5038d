"""Mechanics shared by the faiss/hnswlib back-ends: page tables, the search pipeline, threads and imports.

A :class:`LibraryIndex` keeps one vector-library index per (batch row, KV head) over float32 copies of the keys
and leaves only the library calls to its subclasses (four hooks, below). Pages come in two kinds:

* :class:`PositionalPages`: page ``p`` holds tokens ``pS .. pS+S-1`` in arrival order, as in ``exact``.
* :class:`GroupPages`: the library puts every token in a group (an IVF inverted list); each group is cut into
  ``ceil(n/S)`` pages whose sizes differ by at most one (tokens in id order), and a token added later joins
  its group's last page, or a new page of that group when the last one is full.

Search (every leaf): the library returns, per query head, the ``m = ceil(k * S * oversample)`` best tokens it
finds, best first; each token maps to its page and a head's pages are ranked by their best token (first
occurrence in that list), the first ``k`` distinct kept. With exact token scores ``oversample = 1`` already
finds the exact top-``k`` pages: the best token of the k-th best page has at most ``(k-1) * S`` better tokens,
all in better pages. The heads of a GQA group are then merged by interleaving ranks
(``kvpolicy.ops.gqa_merge``). A head that found fewer than ``min(k, P)`` pages (``k >= P``, an IVF probe that
covers few pages, a graph search that stops early) is topped up from the pages it did not reach: by their
group's centroid score for grouped pages, in id order for positional ones. So ``k >= P`` returns every page.

Threads: ``num_threads`` (default 1) is set around every library call (faiss: ``omp_set_num_threads``,
restored after the call, per calling thread; hnswlib: ``num_threads=``). One thread because a search call
holds the G query heads of one (b, KV head), too few to amortise an OpenMP fork, because HNSW graphs built
with several threads depend on thread scheduling (with one thread and the fixed seeds every build is
reproducible; conformance checks that two builds search identically), and because on the 2-core test machine
2 faiss threads made PQ training slower, not faster (``docs/indexes.md``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kvpolicy.errors import require
from kvpolicy.interfaces import Index
from kvpolicy.ops import check_tensor, gqa_merge
from kvpolicy.types import PAD, PageLayout, SearchParams, Selection

__all__ = [
    "FaissIndex", "GroupPages", "LibraryIndex", "PositionalPages", "check_int", "check_pq_fields", "first_distinct",
    "pq_m",
]


def first_distinct(ids: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` distinct non-PAD ids of every row, in order: ids [..., L] int64 -> [..., min(k, L)]."""
    *lead, L = ids.shape
    return gqa_merge(ids.reshape(-1, 1, 1, L), k).reshape(*lead, -1)


def check_int(what: str, v: object, lo: int, hi: int | None = None, *, optional: bool = False) -> None:
    """ValueError unless ``v`` is an int in ``[lo, hi]`` (or None when ``optional``)."""
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{what} must be {'None or ' if optional else ''}an int {rng}, got {v!r}")


def check_pq_fields(m: object, nbits: object, min_points: object) -> None:
    """ValueError unless the PQ fields ``m`` (None or >= 1), ``nbits`` (3..16), ``min_points`` (>= 1) are valid.
    (faiss's 2-dim sub-quantizer distance tables need a multiple of 8 centroids, hence nbits >= 3.)"""
    check_int("m", m, 1, optional=True)
    check_int("nbits", nbits, 3, 16)
    check_int("min_points_per_centroid", min_points, 1)


def pq_m(d: int, m: int | None, what: str) -> int:
    """Sub-quantizers of a PQ over dim ``d``: ``m``, or (None) ``d / 2``, 2 dimensions each (the largest
    divisor of ``d`` not above ``d / 2`` when 2 does not divide it)."""
    if m is None:
        return max(c for c in range(1, d + 1) if d % c == 0 and c <= max(1, d // 2))
    if d % m:
        raise ValueError(f"{what}: m={m} sub-quantizers must divide the head dim D={d}")
    return m


# ---------------------------------------------------------------------------------------------- pages
class PositionalPages:
    """Page ``p`` of every (b, KV head) holds tokens ``pS .. pS+S-1`` (no tables: ids are arithmetic)."""

    nbytes = 0

    def __init__(self, rows: int, page_size: int) -> None:
        self.rows, self.S, self.n = rows, page_size, 0

    @property
    def num_pages(self) -> torch.Tensor:  # [BH] int64
        return torch.full((self.rows,), -(-self.n // self.S), dtype=torch.int64)

    def _range(self, first: int) -> torch.Tensor:  # [BH, M]
        return torch.arange(first, -(-self.n // self.S), dtype=torch.int64).expand(self.rows, -1).clone()

    def build(self, n: int, groups: list[np.ndarray] | None) -> torch.Tensor:
        self.n = n
        return self._range(0)

    def add(self, n: int, groups: list[np.ndarray] | None) -> torch.Tensor:
        first = self.n // self.S  # the last, partial page changes too
        self.n += n
        return self._range(first)

    def token_pages(self, tok: np.ndarray) -> np.ndarray:  # tok [BH, X] int64, -1 = none -> [BH, X]
        return np.where(tok >= 0, tok // self.S, PAD)

    def page_tokens(self, pages: torch.Tensor) -> torch.Tensor:  # pages [BH, M] -> token ids [BH, M, S]
        t = pages.unsqueeze(-1) * self.S + torch.arange(self.S)
        return torch.where((pages.unsqueeze(-1) >= 0) & (t < self.n), t, PAD)

    def page_groups(self) -> None:
        return None


class GroupPages:
    """Pages cut from groups of tokens (IVF lists), tables per (b, KV head) row::

        tok_page   [BH, T*]     page of each token          page_tok  [BH, P*, S]  tokens of each page, PAD
        page_len   [BH, P*]     tokens in each page         page_group [BH, P*]    group of each page
        group_last [BH, L]      last page of each group (PAD: empty group)         num [BH] pages
    """

    def __init__(self, rows: int, page_size: int, num_groups: int) -> None:
        self.rows, self.S, self.L, self.n = rows, page_size, num_groups, 0
        self.tok_page = np.full((rows, 0), PAD, dtype=np.int64)
        self.page_tok = np.full((rows, 0, page_size), PAD, dtype=np.int64)
        self.page_len = np.zeros((rows, 0), dtype=np.int64)
        self.page_group = np.full((rows, 0), PAD, dtype=np.int64)
        self.group_last = np.full((rows, num_groups), PAD, dtype=np.int64)
        self.num = np.zeros(rows, dtype=np.int64)

    @property
    def num_pages(self) -> torch.Tensor:
        return torch.from_numpy(self.num.copy())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.tok_page, self.page_tok, self.page_len, self.page_group,
                                      self.group_last, self.num))

    def _grow(self, tokens: int, pages: int) -> None:
        """Room for ``tokens`` tokens and ``pages`` pages per row (capacity at least doubles)."""
        def grow(a: np.ndarray, size: int, fill: int) -> np.ndarray:
            if a.shape[1] >= size:
                return a
            new = np.full((a.shape[0], max(size, 2 * a.shape[1], 16), *a.shape[2:]), fill, dtype=a.dtype)
            new[:, : a.shape[1]] = a
            return new

        self.tok_page = grow(self.tok_page, tokens, PAD)
        self.page_tok = grow(self.page_tok, pages, PAD)
        self.page_len = grow(self.page_len, pages, 0)
        self.page_group = grow(self.page_group, pages, PAD)

    def build(self, n: int, groups: list[np.ndarray]) -> torch.Tensor:
        S, L = self.S, self.L
        cuts = []
        for g in groups:  # g [T] int64 in [0, L): one row
            order = np.argsort(g, kind="stable")  # tokens grouped, id order inside a group
            cnt = np.bincount(g, minlength=L)  # [L]
            npg = -(-cnt // S)  # [L] pages per group
            gs = g[order]
            rank = np.arange(n) - (np.cumsum(cnt) - cnt)[gs]  # position inside the group
            q, rem = cnt[gs] // np.maximum(npg[gs], 1), cnt[gs] % np.maximum(npg[gs], 1)
            big = rem * (q + 1)  # tokens in the pages of q+1 (even fill: sizes differ by at most one)
            qq = np.maximum(q, 1)
            j = np.where(rank < big, rank // (q + 1), rem + (rank - big) // qq)
            slot = np.where(rank < big, rank % (q + 1), (rank - big) % qq)
            first = np.cumsum(npg) - npg  # [L] first page of each group
            cuts.append((order, first[gs] + j, slot, npg, first))
        P = max((int(c[3].sum()) for c in cuts), default=0)
        self._grow(n + max(256, n // 8), P + max(64, P // 8))
        for r, (order, page, slot, npg, first) in enumerate(cuts):
            self.tok_page[r, order] = page
            self.page_tok[r, page, slot] = order
            self.page_len[r, : int(npg.sum())] = np.bincount(page, minlength=int(npg.sum()))
            self.page_group[r, : int(npg.sum())] = np.repeat(np.arange(L), npg)
            self.group_last[r] = np.where(npg > 0, first + npg - 1, PAD)
            self.num[r] = npg.sum()
        self.n = n
        pids = torch.arange(P, dtype=torch.int64).expand(self.rows, P)
        return torch.where(pids < torch.from_numpy(self.num)[:, None], pids, PAD)

    def add(self, n: int, groups: list[np.ndarray]) -> torch.Tensor:
        S, t0 = self.S, self.n
        self._grow(t0 + n, int(self.num.max()) + n)
        top = max(int(g.max(initial=-1)) for g in groups) + 1
        if top > self.L:  # a group that was empty at build
            self.group_last = np.concatenate(
                [self.group_last, np.full((self.rows, top - self.L), PAD, dtype=np.int64)], axis=1)
            self.L = top
        dirty: list[list[int]] = []
        for r, g in enumerate(groups):  # g [n] group of each new token of row r
            touched: list[int] = []
            for grp in np.unique(g):
                toks = t0 + np.flatnonzero(g == grp)  # id order
                last = int(self.group_last[r, grp])
                if last >= 0 and self.page_len[r, last] < S:  # fill the group's last page first
                    take = toks[: S - self.page_len[r, last]]
                    fill = int(self.page_len[r, last])
                    self.page_tok[r, last, fill : fill + take.size] = take
                    self.page_len[r, last] += take.size
                    self.tok_page[r, take] = last
                    touched.append(last)
                    toks = toks[take.size :]
                for i in range(0, toks.size, S):  # then new pages of that group
                    chunk, p = toks[i : i + S], int(self.num[r])
                    self.page_tok[r, p, : chunk.size] = chunk
                    self.page_len[r, p] = chunk.size
                    self.page_group[r, p] = grp
                    self.tok_page[r, chunk] = p
                    self.group_last[r, grp] = p
                    self.num[r] += 1
                    touched.append(p)
            dirty.append(sorted(touched))
        self.n = t0 + n
        M = max((len(d) for d in dirty), default=0)
        out = torch.full((self.rows, M), PAD, dtype=torch.int64)
        for r, d in enumerate(dirty):
            out[r, : len(d)] = torch.tensor(d, dtype=torch.int64)
        return out

    def token_pages(self, tok: np.ndarray) -> np.ndarray:
        pages = np.take_along_axis(self.tok_page, np.maximum(tok, 0), axis=1)
        return np.where(tok >= 0, pages, PAD)

    def page_tokens(self, pages: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(pages.shape[0])[:, None]
        t = torch.from_numpy(self.page_tok)[rows, pages.clamp(min=0)]  # [BH, M, S]
        return torch.where(pages.unsqueeze(-1) >= 0, t, PAD)

    def page_groups(self) -> np.ndarray:  # [BH, P*] group of each page, PAD beyond num
        return self.page_group


# ---------------------------------------------------------------------------------------------- index
@dataclass(kw_only=True)
class LibraryIndex(Index):
    """Base of the faiss/hnswlib back-ends (see the module docstring). Subclasses implement:

    * ``_new_row(x)``: x ``[T, D]`` float32 -> ``(row, groups)``: the library index of one (b, KV head) and
      ``groups [T]`` int64 (grouped pages) or ``None`` (positional pages).
    * ``_extend_row(row, x, first_id)``: appends x ``[n, D]`` (ids ``first_id ..``) -> groups ``[n]`` or None.
    * ``_search_row(row, q, m, params)``: q ``[G, D]`` float32 -> token ids ``[G, m]`` int64, best first, -1
      where the library found fewer.
    * ``_row_nbytes(row)``; optionally ``_group_scores(row, q)`` -> ``[G, L]`` (order of the top-up pages).
    """

    supports_add: ClassVar[bool] = True
    library: ClassVar[str] = ""  # module imported by __post_init__
    extra: ClassVar[str] = ""  # pip extra that installs it

    oversample: float = 1.0
    num_threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        self._check_fields()
        self._lib = require(self.library, extra=self.extra, why=f"index {self.name!r}")
        self.reset()

    def _check_fields(self) -> None:
        v = self.oversample
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1.0:
            raise ValueError(f"oversample must be a number >= 1, got {v!r}")
        check_int("num_threads", self.num_threads, 1)
        if torch.device(self.device).type != "cpu":
            raise ValueError(f"index {self.name!r} searches on the CPU (device='cpu'), got device={self.device!r}")

    def reset(self) -> None:
        self._rows: list[Any] = []  # one library index per (b, KV head), row = b * Hkv + h
        self._pages: PositionalPages | GroupPages | None = None
        self._B = self._H = self._D = self._S = self._n = 0

    # ---------------------------------------------------------------- hooks
    def _new_row(self, x: np.ndarray) -> tuple[Any, np.ndarray | None]:
        raise NotImplementedError

    def _extend_row(self, row: Any, x: np.ndarray, first_id: int) -> np.ndarray | None:
        raise NotImplementedError

    def _search_row(self, row: Any, q: np.ndarray, m: int, params: SearchParams | None) -> np.ndarray:
        raise NotImplementedError

    def _row_nbytes(self, row: Any) -> int:
        raise NotImplementedError

    def _group_scores(self, row: Any, q: np.ndarray) -> np.ndarray | None:
        return None

    def _threads(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- state
    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def num_pages(self) -> torch.Tensor:
        if self._pages is None:
            return torch.zeros((0, 0), dtype=torch.int64)
        return self._pages.num_pages.view(self._B, self._H)

    @property
    def nbytes(self) -> int:
        """Library memory of every (b, KV head) index plus the page tables (see each class for how)."""
        if self._pages is None:
            return 0
        return sum(self._row_nbytes(r) for r in self._rows) + self._pages.nbytes

    def token_pages(self) -> torch.Tensor:
        """Page of every token: ``[B, Hkv, T]`` int64 (introspection and tests)."""
        if self._pages is None:
            return torch.zeros((0, 0, 0), dtype=torch.int64)
        tok = np.broadcast_to(np.arange(self._n, dtype=np.int64), (self._B * self._H, self._n))
        return torch.from_numpy(self._pages.token_pages(np.ascontiguousarray(tok))).view(self._B, self._H, self._n)

    # ---------------------------------------------------------------- build / add
    @staticmethod
    def _float32(keys: torch.Tensor, rows: int) -> np.ndarray:
        """keys [B, Hkv, n, D] -> float32 C-contiguous numpy [BH, n, D] (a copy unless already so)."""
        B, H, n, D = keys.shape
        return np.ascontiguousarray(keys.detach().to("cpu", torch.float32).reshape(rows, n, D).numpy())

    def _layout(self, pages: torch.Tensor) -> PageLayout:
        """Layout of pages [BH, M] (PAD-padded)."""
        B, H, S = self._B, self._H, self._S
        M = pages.shape[1]
        tids = self._pages.page_tokens(pages)  # [BH, M, S]
        return PageLayout(
            page_ids=pages.reshape(B, H, M).clone(),
            token_ids=tids.reshape(B, H, M, S).clone(),
            lengths=(tids >= 0).sum(-1).to(torch.int32).reshape(B, H, M),
            num_pages=self.num_pages.clone(),
            num_tokens=self._n,
        )

    def build(self, keys: torch.Tensor, *, page_size: int) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, T, D]")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        B, H, T, D = keys.shape
        if B < 1 or H < 1 or D < 1:
            raise ValueError(f"keys must have B, Hkv, D >= 1, got shape {tuple(keys.shape)}")
        self.reset()
        self._B, self._H, self._D, self._S = B, H, D, page_size  # _new_row may read them
        x = self._float32(keys, B * H)  # [BH, T, D] float32
        with self._threads():
            built = [self._new_row(x[r]) for r in range(B * H)]
        groups = [g for _, g in built]
        pages: PositionalPages | GroupPages
        if groups[0] is None:
            pages = PositionalPages(B * H, page_size)
        else:
            pages = GroupPages(B * H, page_size, int(max(int(g.max(initial=0)) for g in groups)) + 1)
        first = pages.build(T, groups)
        self._rows, self._pages, self._n = [r for r, _ in built], pages, T
        return self._layout(first)

    def add(self, keys: torch.Tensor) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, n, D]")
        if self._pages is None:
            raise RuntimeError(f"{type(self).__name__}.add() before build()")
        B, H, D = self._B, self._H, self._D
        if keys.shape[0] != B or keys.shape[1] != H or keys.shape[3] != D:
            raise ValueError(f"keys shape {tuple(keys.shape)} does not match the index [B={B}, Hkv={H}, n, D={D}]")
        n = keys.shape[2]
        if n == 0:
            return self._layout(torch.full((B * H, 0), PAD, dtype=torch.int64))
        x = self._float32(keys, B * H)  # [BH, n, D]
        with self._threads():
            groups = [self._extend_row(row, x[r], self._n) for r, row in enumerate(self._rows)]
        dirty = self._pages.add(n, None if groups[0] is None else groups)
        self._n += n
        return self._layout(dirty)

    # ---------------------------------------------------------------- search
    def _queries(self, queries: torch.Tensor) -> np.ndarray:
        """queries [B, Hq, D] -> float32 numpy [BH, G, D]."""
        check_tensor("queries", queries, 3, dims="[B, Hq, D]")
        if self._pages is None:
            raise RuntimeError(f"{type(self).__name__}.search() before build()")
        B, H, D = self._B, self._H, self._D
        if queries.shape[0] != B or queries.shape[-1] != D or queries.shape[1] % H or queries.shape[1] == 0:
            raise ValueError(f"queries shape {tuple(queries.shape)} is not [B={B}, Hq (multiple of Hkv={H}), D={D}]")
        G = queries.shape[1] // H
        return np.ascontiguousarray(queries.detach().to("cpu", torch.float32).reshape(B * H, G, D).numpy())

    def search(self, queries: torch.Tensor, k: int, *, params: SearchParams | None = None) -> Selection:
        q = self._queries(queries)  # [BH, G, D]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        BH, G, _ = q.shape
        num = self._pages.num_pages  # [BH]
        kk = min(k, int(num.max()))
        if kk == 0 or self._n == 0:
            return Selection(page_ids=torch.full((self._B, self._H, 0), PAD, dtype=torch.int64))
        m = min(self._n, math.ceil(kk * self._S * self.oversample))  # tokens retrieved per query head
        with self._threads():  # tok: [BH, G, m] token ids, best first, -1 where the library found fewer
            tok = np.stack([self._search_row(row, q[r], m, params) for r, row in enumerate(self._rows)])
        pages = torch.from_numpy(self._pages.token_pages(tok.reshape(BH, -1)).reshape(BH, G, -1))  # [BH, G, m]
        ranked = first_distinct(pages, kk)  # [BH, G, <=kk] each head's pages by their best token
        ranked = torch.nn.functional.pad(ranked, (0, kk - ranked.shape[-1]), value=PAD)  # [BH, G, kk]
        short = (ranked >= 0).sum(-1) < num.clamp(max=kk)[:, None]  # [BH, G] heads with < min(k, P) pages
        if bool(short.any()):
            topped = first_distinct(torch.cat([ranked, self._top_up(q)], -1), kk)  # [BH, G, kk]
            ranked = torch.where(short[..., None], topped, ranked)
        return Selection(page_ids=gqa_merge(ranked.view(self._B, self._H, G, kk), kk))  # [B, Hkv, kk]

    def _top_up(self, q: np.ndarray) -> torch.Tensor:
        """Every page of each row in top-up order: q [BH, G, D] -> [BH, G, P] page ids (PAD past a row's pages)."""
        BH, G, _ = q.shape
        num = self._pages.num_pages
        P = int(num.max())
        ids = torch.arange(P, dtype=torch.int64).expand(BH, G, P)
        pg = self._pages.page_groups()
        if pg is not None:
            scores = [self._group_scores(row, q[r]) for r, row in enumerate(self._rows)]
            if scores[0] is not None:
                ps = np.stack([s[:, np.maximum(pg[r, :P], 0)] for r, s in enumerate(scores)])  # [BH, G, P]
                ps = np.where(np.arange(P) < num.numpy()[:, None, None], ps, -np.inf)
                ids = torch.from_numpy(np.argsort(-ps, axis=-1, kind="stable"))
        return torch.where(ids < num[:, None, None], ids, PAD)


@dataclass(kw_only=True)
class FaissIndex(LibraryIndex):
    """faiss back-ends: threads through ``faiss.omp_set_num_threads``; ``nbytes`` is the size of every
    (b, KV head) index as ``faiss.serialize_index`` writes it (codes, ids, centroids, graph links: what the
    index holds in memory, up to allocator slack; it costs one copy of the index, so it is a report, not a
    hot-path call) plus the page tables."""

    library: ClassVar[str] = "faiss"
    extra: ClassVar[str] = "faiss"
    requires: ClassVar[tuple[str, ...]] = ("faiss",)

    @contextlib.contextmanager
    def _threads(self):
        faiss = self._lib
        old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.num_threads)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(old)

    def _row_nbytes(self, row: Any) -> int:
        return int(self._lib.serialize_index(row).nbytes)
