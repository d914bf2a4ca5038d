"""``dci_tree``: IceCache's multi-level DCI tree (M-DCI) as a batched, semantic page index.

One tree per (batch row, KV head), all of them processed together in tensor code (CPU or CUDA). The algorithm
follows the reference implementation (yuzhenmao/M-DCI ``src/dci.c``, ``src/btree_p.c``; yuzhenmao/IceCache
``infer_state.py``) as summarised in ``research/icecache.md`` §1.3 and §2; the tensor formulation and the
deviations listed in :class:`DCITreeIndex` are ours.

Geometry (MIPS -> nearest neighbour, dci.c ``data_projection``/``transform_compute_dist*``): with ``M`` the running
maximum squared key norm of one (b, head), a key ``k`` stands for ``[k, sqrt(M - |k|^2)]`` and a query for
``[q/|q|, 0]``, so the nearest key in that space is the key of largest ``q . k``. Two keys are compared by
``M - k1.k2 - sqrt((M - |k1|^2)(M - |k2|^2))`` (half their squared distance in the lifted space).

Structure (every token lives on exactly one level; levels are shared by all heads, parents are per head)::

    level L-1   top points            members of the root cell
    level l>=1  centres               each owns a *cell*: its children on level l-1 (its nearest-centre set)
    level 0     ordinary tokens

Inside every cell (the root's included) the members are sorted by their projection on a random direction
``u in R^{D+1}`` and cut into leaves of at most ``S`` tokens, evenly filled; **each leaf is one KV page**. So a
page holds tokens that share their nearest centre and lie next to each other along ``u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvpolicy.concurrency import capture_lock
from kvpolicy.interfaces import Index
from kvpolicy.ops import check_tensor, gqa_merge, page_max_scores, storage_key, topk_ids, triton_available
from kvpolicy.types import PAD, PageLayout, SearchParams, Selection

__all__ = ["DCITreeIndex", "promotion_levels"]

_NEG_INF = float("-inf")
_CHUNK_ELEMS = 1 << 22  # score-matrix entries per chunk of the brute-force parent assignment


# ---------------------------------------------------------------------------------------------- promotion
def promotion_levels(n: int, ratio_1: float, ratio_2: float) -> torch.Tensor:
    """Deterministic, position-ordered promotion of ``n`` tokens -> level of each token ``[n]`` int64 (CPU).

    Same rule as the reference (dci.c ``construct_new_tree`` with ``random=False``, float32 arithmetic as in
    C): the token after the one that satisfies ``count[t] + 1 >= count[t+1] / p_t`` goes to level ``t+1``,
    and the top level opens a new level above once it holds ``ceil(1/p)`` points (``p_0 = ratio_1``,
    ``p_t = ratio_2`` for ``t >= 1``). With (0.01, 0.2), 32 000 tokens give level sizes
    [31603, 317, 64, 13, 3] and the first promoted positions are 100, 102, 202, 303, ...

    The loop runs once per promotion event (about ``ratio_1 * n`` times), jumping over runs of level-0 tokens.
    """
    p = (np.float32(ratio_1), np.float32(ratio_2))

    def prob(t: int) -> np.float32:
        return p[0] if t == 0 else p[1]

    def promo(t: int) -> int:
        return int(np.ceil(np.float32(1.0) / prob(t)))

    counts: list[int] = []
    events_pos: list[int] = []
    events_lvl: list[int] = []
    nxt, pos = 0, 0
    while pos < n:
        t = nxt
        if t == 0 and counts:  # a run of level-0 tokens, up to and including the one that triggers promotion
            c0 = counts[0]
            if len(counts) == 1:
                stop = promo(0) - 1 if c0 <= promo(0) - 1 else None
            else:
                stop = max(c0, math.ceil(float(np.float32(counts[1]) / prob(0))) - 1)
            run = n - pos if stop is None else stop - c0 + 1
            take = min(run, n - pos)
            counts[0] += take
            pos += take
            nxt = 1 if (stop is not None and take == run) else 0
            continue
        if t == len(counts):  # opens a new level
            counts.append(0)
            nxt = 0
        elif t == len(counts) - 1:  # top level
            nxt = t + 1 if counts[t] + 1 == promo(t) else 0
        else:
            nxt = t + 1 if counts[t] + 1 >= float(np.float32(counts[t + 1]) / prob(t)) else 0
        counts[t] += 1
        if t > 0:
            events_pos.append(pos)
            events_lvl.append(t)
        pos += 1
    levels = torch.zeros(n, dtype=torch.int64)
    if events_pos:
        levels[torch.tensor(events_pos)] = torch.tensor(events_lvl)
    return levels


def _random_levels(n: int, ratio_1: float, ratio_2: float, seed: int, max_levels: int = 16) -> torch.Tensor:
    """Random promotion (reference ``random=True``): level 0->1 with probability ratio_1, each further level
    with ratio_2; empty levels are removed. Seeded, so deterministic. -> [n] int64 (CPU)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(n, generator=g) < ratio_1
    more = (torch.rand(n, max_levels - 2, generator=g) < ratio_2).to(torch.int64).cumprod(-1).sum(-1)
    lv = torch.where(first, 1 + more, torch.zeros_like(more))
    present = torch.unique(lv)  # sorted; relabel so that levels are 0..L-1 without gaps
    remap = torch.full((max_levels,), -1, dtype=torch.int64)
    remap[present] = torch.arange(present.numel())
    return remap[lv]


# ---------------------------------------------------------------------------------------------- helpers
def _triton_interpreting() -> bool:
    if not triton_available():
        return False
    from kvpolicy_kernels._checks import interpreting

    return interpreting()


def _segment_pos(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Position of each entry inside its run of equal keys (keys sorted along the last dim)."""
    n = sorted_keys.shape[-1]
    idx = torch.arange(n, device=sorted_keys.device).expand_as(sorted_keys)
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    if n > 1:
        start[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


def _compact(vals: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Move the valid entries of each row to the front (order kept), PAD after. [R, N] -> [R, max count]."""
    R, N = vals.shape
    width = int(valid.sum(-1).max()) if valid.numel() else 0
    pos = torch.where(valid, valid.cumsum(-1) - 1, torch.full_like(vals, width))
    out = torch.full((R, width + 1), PAD, dtype=vals.dtype, device=vals.device)
    out.scatter_(1, pos, torch.where(valid, vals, torch.full_like(vals, PAD)))
    return out[:, :width]


def _unique_rows(vals: torch.Tensor) -> torch.Tensor:
    """Distinct non-PAD values of each row, ascending, PAD-padded. [R, N] int64 -> [R, max count]."""
    if vals.shape[-1] == 0:
        return vals
    s = vals.sort(-1).values
    keep = s >= 0
    keep[:, 1:] &= s[:, 1:] != s[:, :-1]
    return _compact(s, keep)


# ---------------------------------------------------------------------------------------------- index
@dataclass(kw_only=True)
class DCITreeIndex(Index):
    """IceCache's DCI tree: semantic pages (leaves of per-cell projection-sorted lists) and a multi-level,
    field-of-view search over them. One tree per (batch row, KV head), all trees in one set of tensors.

    **Build** (``build(keys, page_size=S)``):

    1. Levels: deterministic position-ordered promotion (:func:`promotion_levels`; ``ratio_1`` to level 1,
       ``ratio_2`` above, reference defaults 0.01 / 0.2) or, with ``random_promotion=True``, seeded random
       promotion. Levels depend on positions only, so every head has the same centres.
    2. Parents, top-down: every point's parent is its nearest point one level up under the lifted key-key
       distance, by exact brute force (one batched matmul per level, chunked). The reference does the same
       while the upper level has at most 3000 points (always for level 1 below ~300k tokens at ratio 0.01).
    3. Pages: in every cell, members sorted by projection on direction 0 of ``num_simple * num_composite``
       normalised Gaussian directions in R^{D+1} drawn from ``seed`` (shared by all heads, and by all layers
       built with the same seed, as IceCache shares one ``proj_vec``), cut into ``ceil(n/S)`` leaves whose sizes differ by
       at most one (reference B+-tree bulk load). Centres are tokens too and sit in pages of their parent's
       cell (the root cell for the top level), so every token is in exactly one page.

    **Search** (``search(queries, k)``): cumulative descent from the root with field of view
    ``F = field_of_view or max(int(fov_ratio * T), min_field_of_view)`` (reference: 0.0015, 30). At each level
    every token of the frontier cells is scored exactly by ``q . k``; each query head keeps its top
    ``max(min(F, found), k')`` centres (``k'``: the shortest prefix whose subtrees hold ``k`` pages, the reference
    rule), and their cells form the next frontier. Pages are ranked by their best scored token over all levels
    (upper-level pages included: "cumulative"), top ``k`` per query head, then the GQA group is merged by
    interleaving ranks (``kvpolicy.ops.gqa_merge``). A (row, head) that finds fewer than ``min(k, pages)`` pages
    (tiny trees, huge ``k``) is ranked by an exact scan. Two implementations give identical selections
    (``search_mode``; tested): ``"beam"`` gathers and scores only the frontier cells' pages (data-dependent
    shapes, one host sync per level; needed for the ``prop_to_*`` pruning); ``"masked"`` scores every key with one
    ``K q^T`` and runs the descent on fixed-shape masks over each level's centres (no key gathers, no host
    sync; on CUDA it is captured once into a CUDA graph and replayed, ``cuda_graphs=True``, re-captured only when
    a table is reallocated). On CUDA (``fused_scores=None``: when triton is installed; ``True`` forces it, e.g.
    under the Triton interpreter, ``False`` never) the page maxima come from one Triton kernel that reads the
    keys through the page table, ``kvpolicy_kernels.page_scores.token_page_scores``, instead of an fp32 copy of every key
    and a scatter; only the centres are scored by ``bmm`` (from a float32 copy of each level's centre keys), and
    only the pages of the scanned cells are read. ``"auto"`` (default) takes ``"masked"`` on CUDA unless
    pruning is asked for, ``"beam"`` on the CPU
    (measured 1-thread CPU, Hkv 8, D 128: 17 vs 22 ms at 32k, 66 vs 88 ms at 128k). With the reference's field
    of view and GQA groups of 4 the frontier covers 45-85% of the tokens at 8k-128k (``last_scanned_fraction``).

    **Keys on the host** (``keys_on_host=True`` with a CUDA ``device``): the key store, the one table that grows
    with the context as T x D, lives in pinned CPU memory; centres' keys, projections, page and cell tables stay
    on the GPU. The masked search reads the keys of the scanned pages only, through unified addressing (the GPU
    loads them over PCIe inside the page-score kernel), so the index holds no device copy of the keys; the
    exhaustive path and ``add``'s re-projections read them the same way or on the host. Selections are the
    same as with the device store (tested); each search moves the scanned fraction of the keys over PCIe.

    **Add** (``add(keys)``): new tokens go to level 0, under their nearest level-1 centre (exact brute force
    over the level-1 centres; centres stay fixed after build, as in IceCache's decode). Each one is inserted
    at its projection rank into its cell's leaves: the leaf with the largest first key not above it (B+-tree
    routing). A leaf that overflows is cut into ``ceil(n/S)`` even pieces (one new token into a full leaf:
    halves, as ``btree_p_split_leaf``); the first piece keeps the page id, the others get new ids. If a key
    raises ``M``, every cell that receives a token while projected with an older ``M`` is re-projected and
    re-leafed in place (same page ids, new ones only if it needs more pages; reference
    ``add_and_update_max_sq_norm``). All pages whose contents changed are returned.

    **Deviations from the C code** (and why):

    * Search is a batched beam search, not a per-point priority walk. Within a kept cell every token is
      scored exactly by default (``prop_to_retrieve = prop_to_visit = 1.0``). The C code scans a cell along
      its 1-D projection in batches of 128 (``CLOSEST``) and stops after ``max(nn, min(ceil(prop_to_visit*n),
      ceil(prop_to_retrieve*n)))`` points (IceCache: 0.8); cells of at most 128 points (most level-1 cells at
      ratio 0.01) are therefore scanned exactly there too. Setting ``prop_to_retrieve``/``prop_to_visit``
      below 1 (fields or ``SearchParams``) reproduces that pruning per query head, except that we visit the
      ``v`` tokens closest in projection rather than whole 128-blocks from the nearer side. Pruning does not
      save time here (the batched scan scores the gathered pages anyway; the rank computation costs extra)
      and costs recall (``benchmarks/bench_dci_tree.py``: 0.97 vs 1.0 at 8k/32k), hence the default.
    * The query heads of a GQA group share one gather: each head scores the union of the group's frontier
      cells and picks its beam from that union (the C code descends per query head). The gather costs no
      more than per-head gathers, and each head ranks a superset of its own candidates.
    * When one level's candidate tokens exceed ``dense_scan_fraction`` of the index (GQA unions at the
      default field of view reach 50-80%), their scores are taken from one dense ``K q^T`` instead of a
      gather: the same scores, less memory traffic. ``dense_scan_fraction=1.0`` always gathers.
    * Every scored token counts for its page's score, also centres that were scored but not kept.
    * ``add`` finds the nearest level-1 centre exactly instead of with the insertion query
      (fov 20, prop_to_retrieve 0.6). Several tokens landing in one leaf in a single call are placed
      together (one even cut) instead of one by one; the resulting pages match the sequential B+-tree up to
      where the cut falls.
    * Freed page ids are never recycled (re-leafing keeps a cell's page count), so pages are never empty.
    * Not implemented: the anchor shortcut of the parent assignment (the brute force is exact and batched),
      brute-force limits (no approximate parent search above 3000 centres), deletion, and re-clustering of
      the centres during decode.

    Introspection: ``token_pages()``, ``parents()``, ``level_sizes``, ``last_scanned_fraction`` and
    ``validate()`` (raises ValueError if the structure is inconsistent).
    """

    name: ClassVar[str] = "dci_tree"
    supports_add: ClassVar[bool] = True
    # conformance sweep (tests/test_conformance.py) runs tiny(): recall@8 measured 1.0 on the suite's data,
    # 0.875..1.0 (mean 0.96) over 10 key seeds
    conformance: ClassVar[dict] = {"min_recall": 0.8}

    ratio_1: float = 0.01
    ratio_2: float = 0.2
    random_promotion: bool = False
    seed: int = 42
    num_simple: int = 1
    num_composite: int = 1
    field_of_view: int | None = None
    fov_ratio: float = 0.0015
    min_field_of_view: int = 30
    prop_to_retrieve: float = 1.0
    prop_to_visit: float = 1.0
    scan_batch: int = 128
    dense_scan_fraction: float = 0.6
    search_mode: str = "auto"
    cuda_graphs: bool = True
    fused_scores: bool | None = None
    keys_on_host: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        for f in ("ratio_1", "ratio_2"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"{f} must be a float in (0, 1), got {v!r}")
        if not isinstance(self.random_promotion, bool):
            raise TypeError(f"random_promotion must be a bool, got {type(self.random_promotion).__name__}")
        for f, lo in (("seed", 0), ("num_simple", 1), ("num_composite", 1), ("min_field_of_view", 1),
                      ("scan_batch", 1)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{f} must be an int >= {lo}, got {v!r}")
        if self.field_of_view is not None and (
            isinstance(self.field_of_view, bool) or not isinstance(self.field_of_view, int) or self.field_of_view < 1
        ):
            raise ValueError(f"field_of_view must be None or an int >= 1, got {self.field_of_view!r}")
        if isinstance(self.fov_ratio, bool) or not isinstance(self.fov_ratio, (int, float)) or self.fov_ratio < 0:
            raise ValueError(f"fov_ratio must be a float >= 0, got {self.fov_ratio!r}")
        for f in ("prop_to_retrieve", "prop_to_visit"):
            self._check_prop(f, getattr(self, f))
        v = self.dense_scan_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"dense_scan_fraction must be a float in [0, 1], got {v!r}")
        if self.fused_scores is not None and not isinstance(self.fused_scores, bool):
            raise TypeError(f"fused_scores must be None or a bool, got {type(self.fused_scores).__name__}")
        if not isinstance(self.keys_on_host, bool):
            raise TypeError(f"keys_on_host must be a bool, got {type(self.keys_on_host).__name__}")
        if self.keys_on_host and (self.search_mode == "beam" or self.fused_scores is False):
            raise ValueError("keys_on_host scores pages with the fused kernel of the masked search: it needs "
                             f"search_mode 'auto' or 'masked' and fused_scores None or True, got "
                             f"{self.search_mode!r} and {self.fused_scores!r}")
        if self.search_mode not in ("auto", "beam", "masked"):
            raise ValueError(f"search_mode must be 'auto', 'beam' or 'masked', got {self.search_mode!r}")
        torch.device(self.device)  # raises on an unknown device string
        self.reset()

    @staticmethod
    def _check_prop(what: str, v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(f"{what} must be a float in (0, 1], got {v!r}")
        return float(v)

    @classmethod
    def tiny(cls) -> DCITreeIndex:
        """Small-input settings: ~1 centre per 20 tokens and a field of view of 4 cells, so that a few hundred
        tokens already give a multi-level tree whose search does not reduce to an exhaustive scan."""
        return cls(ratio_1=0.05, min_field_of_view=4)

    def reset(self) -> None:
        # Rows are (b, h) pairs, row = b * H + h; T* = capacity. Per row: token tables [BH, T*], page tables
        # [BH, P*, S] / [BH, P*], cell tables [BH, C, ...] (cell 0 = root, cell 1 + i = i-th centre by
        # position). Shared by all rows: level / owned cell of each token, centre token of each cell.
        for name in ("_sq", "_proj", "_parent", "_tok_page", "_tok_slot", "_tok_level", "_tok_cell", "_page_tok",
                     "_page_len", "_num_pages", "_cell_pages", "_cell_npages", "_cell_size", "_cell_M", "_subtree",
                     "_cell_tok", "_M", "_u", "_scratch", "_c1_cell", "_c1_keys", "_c1_sq", "_last_scanned"):
            setattr(self, name, None)
        self._keys: torch.Tensor | None = None  # [BH, T*, D] keys in the input dtype (pinned host: keys_on_host)
        self._level_tok: list[torch.Tensor] = []  # token ids on each level (level 0 is not used)
        self._level_keys: list[torch.Tensor] = []  # [BH, N_l, D] float32 keys of each level's centres (level >= 1)
        self._dev = torch.device(self.device)  # where the tables live and search runs
        self._host_keys = False  # the key store sits in pinned host memory (keys_on_host on a CUDA device)
        self._min_pages = 0  # host copy of num_pages.min() (no sync on the search path)
        self._graph = None  # (key, graph, static query, static fov, output) of the captured masked search
        self._n = 0
        self._S = 0
        self._B = self._H = self._D = 0
        self._L = 0  # number of levels

    # ---------------------------------------------------------------- state
    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def num_pages(self) -> torch.Tensor:
        if self._keys is None:
            return torch.zeros((0, 0), dtype=torch.int64)
        return self._num_pages.view(self._B, self._H).clone()

    @property
    def nbytes(self) -> int:
        if self._keys is None:
            return 0
        return sum(t.nbytes for t in self._tensors())

    @property
    def device_nbytes(self) -> int:
        """Bytes held on a non-CPU device (with ``keys_on_host``, everything but the key store)."""
        if self._keys is None:
            return 0
        return sum(t.nbytes for t in self._tensors() if t.device.type != "cpu")

    @property
    def level_sizes(self) -> list[int]:
        """Tokens on each level, bottom (level 0) first."""
        if self._keys is None or self._n == 0:
            return []
        return torch.bincount(self._tok_level[: self._n], minlength=self._L).tolist()

    def token_pages(self) -> torch.Tensor:
        """Page of every token: ``[B, Hkv, T]`` int64."""
        if self._keys is None:
            return torch.zeros((0, 0, 0), dtype=torch.int64)
        return self._tok_page[:, : self._n].reshape(self._B, self._H, self._n).clone()

    @property
    def last_scanned_fraction(self) -> float:
        """Mean fraction of the tokens of a (b, head) whose score the last ``search`` computed (NaN before)."""
        if self._last_scanned is None or self._n == 0:
            return float("nan")
        return float(self._last_scanned.float().mean()) / self._n

    def parents(self) -> torch.Tensor:
        """Parent of every token (the centre whose cell holds it; PAD for top-level tokens): [B, Hkv, T]."""
        if self._keys is None:
            return torch.zeros((0, 0, 0), dtype=torch.int64)
        par = self._cell_tok[self._parent[:, : self._n]]
        return par.reshape(self._B, self._H, self._n).clone()

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self._keys, self._sq, self._proj, self._parent, self._tok_page, self._tok_slot, self._tok_level,
            self._tok_cell, self._page_tok, self._page_len, self._cell_pages, self._cell_npages, self._cell_size,
            self._cell_M, self._subtree, self._cell_tok, self._M, self._num_pages, self._u, self._scratch,
            self._c1_cell, self._c1_keys, self._c1_sq, self._cell_anc, *self._level_keys[2:],
        ]

    # ---------------------------------------------------------------- capacity
    def _grow_tokens(self, n: int) -> None:
        """Make room for ``n`` tokens in every per-token table (capacity at least doubles when it grows)."""
        cap = self._keys.shape[1]
        if n > cap:
            self._resize_tokens(max(n, 2 * cap, 64))

    def _resize_tokens(self, new: int) -> None:
        def grow(t: torch.Tensor, dim: int, fill: float | int) -> torch.Tensor:
            if t.shape[dim] >= new:
                return t
            shape = list(t.shape)
            shape[dim] = new
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self._keys = grow(self._keys, 1, 0)
        self._sq = grow(self._sq, 1, 0)
        self._proj = grow(self._proj, 1, 0)
        self._parent = grow(self._parent, 1, PAD)
        self._tok_page = grow(self._tok_page, 1, PAD)
        self._tok_slot = grow(self._tok_slot, 1, PAD)
        self._tok_level = grow(self._tok_level, 0, 0)
        self._tok_cell = grow(self._tok_cell, 0, PAD)

    def _grow_pages(self, n: int) -> None:
        cap = self._page_tok.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap, 16)
        BH, S, dev = self._page_tok.shape[0], self._S, self._page_tok.device
        self._page_tok = torch.cat(
            [self._page_tok, torch.full((BH, new - cap, S), PAD, dtype=torch.int64, device=dev)], 1)
        self._page_len = torch.cat([self._page_len, torch.zeros((BH, new - cap), dtype=torch.int64, device=dev)], 1)

    def _grow_cell_pages(self, n: int) -> None:
        cap = self._cell_pages.shape[2]
        if n <= cap:
            return
        new = max(n, 2 * cap, 4)
        BH, C = self._cell_pages.shape[:2]
        pad = torch.full((BH, C, new - cap), PAD, dtype=torch.int64, device=self._cell_pages.device)
        self._cell_pages = torch.cat([self._cell_pages, pad], 2)

    # ---------------------------------------------------------------- geometry
    @staticmethod
    def _sqnorm(k: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(k, dim=-1).square()

    @staticmethod
    def _lift_coord(sq: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """The appended coordinate sqrt(M - |k|^2): sq [BH, n], M [BH] or [BH, n] -> [BH, n]."""
        if M.dim() == 1:
            M = M[:, None]
        return (M - sq).clamp(min=0).sqrt()

    def _project(self, k: torch.Tensor, sq: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Projections of lifted keys ``[k, sqrt(M - |k|^2)]`` on the directions (reference ``data_projection``).

        k [BH, n, D] float, sq [BH, n], M [BH] or [BH, n] -> [BH, n, num_simple * num_composite] float32."""
        D = self._D
        return k @ self._u[:, :D].T + self._lift_coord(sq, M)[..., None] * self._u[:, D]

    def _nearest(self, x: torch.Tensor, sqx: torch.Tensor, c: torch.Tensor, sqc: torch.Tensor,
                 M: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre under the lifted key-key distance
        ``M - x.c - sqrt((M - |x|^2)(M - |c|^2))``, i.e. the argmax of ``x.c + sqrt(..)sqrt(..)``.

        x [BH, n, D], c [BH, m, D] float; M [BH] -> [BH, n] int64 in [0, m). Exact, chunked over n."""
        BH, n, _ = x.shape
        m = c.shape[1]
        ct = c.transpose(1, 2)  # [BH, D, m]
        ac = self._lift_coord(sqc, M)[:, None, :]  # [BH, 1, m]
        step = max(1, _CHUNK_ELEMS // max(1, BH * m))
        out = []
        for s in range(0, n, step):
            sc = torch.bmm(x[:, s : s + step], ct)
            sc.baddbmm_(self._lift_coord(sqx[:, s : s + step], M)[:, :, None], ac)  # + a_x a_c (rank-1)
            out.append(sc.argmax(-1))
        return torch.cat(out, 1) if out else torch.zeros((BH, 0), dtype=torch.int64, device=x.device)

    def _gather_keys(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows ``flat`` of the key store as float32 [N, D], through a reused buffer (no fresh allocation:
        on CPU a new multi-MB tensor costs more in page faults than the copy itself)."""
        N, D = flat.numel(), self._D
        if self._host_keys:  # rows picked on the host, then moved (add() re-projections: a background job)
            return torch.index_select(self._keys.view(-1, D), 0, flat.cpu()).to(self._dev).float()
        if self._scratch.shape[0] < N:
            self._scratch = torch.empty((max(N, 2 * self._scratch.shape[0]), D), dtype=self._keys.dtype,
                                        device=self._keys.device)
        out = torch.index_select(self._keys.view(-1, D), 0, flat, out=self._scratch[:N])
        return out if out.dtype == torch.float32 else out.float()

    # ---------------------------------------------------------------- build
    def build(self, keys: torch.Tensor, *, page_size: int) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, T, D]")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        B, H, T, D = keys.shape
        if B < 1 or H < 1 or D < 1:
            raise ValueError(f"keys must have B, Hkv, D >= 1, got shape {tuple(keys.shape)}")
        self.reset()
        dev = self._dev
        if self.keys_on_host and dev.type == "cuda" and not triton_available():
            raise RuntimeError("keys_on_host on a CUDA device scores pages with a Triton kernel: install triton")
        # on a CPU device the keys are host memory anyway; the host-keys code path runs there only under the
        # Triton interpreter (tests), since it scores pages with the kernel
        self._host_keys = self.keys_on_host and (dev.type == "cuda" or _triton_interpreting())
        BH, S = B * H, page_size
        self._B, self._H, self._D, self._S, self._n = B, H, D, S, T
        cap = T + max(256, T // 8)  # headroom for add() before the first (copying) growth
        kd = keys.detach().to(dev).reshape(BH, T, D)
        self._keys = torch.zeros((BH, cap, D), dtype=keys.dtype, device="cpu" if self._host_keys else dev,
                                 pin_memory=self._host_keys and dev.type == "cuda")
        self._keys[:, :T] = kd
        kf = kd.float()
        self._sq = self._sqnorm(kf)  # [BH, T]
        self._M = self._sq.amax(-1) if T else torch.zeros(BH, device=dev)  # [BH]
        g = torch.Generator().manual_seed(self.seed)
        u = torch.randn(self.num_simple * self.num_composite, D + 1, generator=g, dtype=torch.float64)
        self._u = (u / u.norm(dim=-1, keepdim=True)).float().to(dev)  # [nd, D+1]

        # levels (shared by all heads) and cells: cell 0 = root, cell 1 + i = centre i (centres in position order)
        lv = (_random_levels(T, self.ratio_1, self.ratio_2, self.seed) if self.random_promotion
              else promotion_levels(T, self.ratio_1, self.ratio_2))
        self._L = int(lv.max()) + 1 if T else 0
        centres = torch.nonzero(lv >= 1).flatten()
        C = 1 + centres.numel()
        tok_cell = torch.full((T,), PAD, dtype=torch.int64)
        tok_cell[centres] = torch.arange(1, C)
        self._tok_level = lv.to(dev)
        self._tok_cell = tok_cell.to(dev)
        self._cell_tok = torch.cat([torch.tensor([PAD]), centres]).to(dev)  # [C] centre token of each cell

        # parents, top-down: nearest point one level up (exact, batched over heads)
        self._parent = torch.zeros((BH, T), dtype=torch.int64, device=dev)
        for lvl in range(self._L - 2, -1, -1):
            up = torch.nonzero(self._tok_level == lvl + 1).flatten()
            kc, sqc = kf[:, up], self._sq[:, up]
            if lvl == 0:  # ~99% of the tokens: score all of them in place (no copy), keep level 0's
                near = self._nearest(kf, self._sq, kc, sqc, self._M)
                self._parent = torch.where(self._tok_level == 0, self._tok_cell[up][near], self._parent)
            else:
                mem = torch.nonzero(self._tok_level == lvl).flatten()
                near = self._nearest(kf[:, mem], self._sq[:, mem], kc, sqc, self._M)
                self._parent[:, mem] = self._tok_cell[up][near]

        self._proj = self._project(kf, self._sq, self._M)  # [BH, T, nd]
        # level-1 centres (fixed after build): new tokens of add() go under the nearest of them
        c1 = torch.nonzero(self._tok_level == 1).flatten()
        self._c1_cell = self._tok_cell[c1]  # [N1]
        self._c1_keys = kf.index_select(1, c1).clone()  # [BH, N1, D] float32
        self._c1_sq = self._sq.index_select(1, c1)  # [BH, N1]
        # tokens of each upper level (fixed after build: add() puts new tokens on level 0), for masked search
        self._level_tok = [c1[:0]] + [torch.nonzero(self._tok_level == lvl).flatten() for lvl in range(1, self._L)]
        # their keys on the search device (the centre scores of the masked search read no key store)
        self._level_keys = [self._c1_keys[:, :0]] + [
            self._c1_keys if lvl == 1 else kf.index_select(1, self._level_tok[lvl]) for lvl in range(1, self._L)]
        self._tok_page = torch.full((BH, T), PAD, dtype=torch.int64, device=dev)
        self._tok_slot = torch.full((BH, T), PAD, dtype=torch.int64, device=dev)
        self._page_tok = torch.full((BH, 0, S), PAD, dtype=torch.int64, device=dev)
        self._page_len = torch.zeros((BH, 0), dtype=torch.int64, device=dev)
        self._num_pages = torch.zeros(BH, dtype=torch.int64, device=dev)
        self._cell_pages = torch.full((BH, C, 0), PAD, dtype=torch.int64, device=dev)
        self._cell_npages = torch.zeros((BH, C), dtype=torch.int64, device=dev)
        self._cell_size = torch.zeros((BH, C), dtype=torch.int64, device=dev)
        self._cell_M = self._M[:, None].expand(BH, C).clone()
        self._scratch = torch.empty((0, D), dtype=self._keys.dtype, device=dev)
        self._subtree = torch.zeros((BH, C), dtype=torch.int64, device=dev)
        self._cell_anc = self._ancestors()  # [BH, C, L+1] fixed after build (centres and their parents are)

        rows = torch.arange(BH, device=dev)
        if T:
            self._cell_size.index_put_((rows[:, None].expand(BH, T), self._parent),
                                       torch.ones_like(self._parent), accumulate=True)
            # one fill group per (row, cell), groups ordered by (row, cell)
            g_row = rows.repeat_interleave(C)
            g_cell = torch.arange(C, device=dev).repeat(BH)
            cnt = self._cell_size.flatten()
            items_group = (rows[:, None] * C + self._parent).flatten()
            items_tok = torch.arange(T, device=dev).repeat(BH)
            no_exist = torch.full((BH * C, 1), PAD, dtype=torch.int64, device=dev)
            self._fill(g_row, g_cell, no_exist, torch.zeros_like(cnt), -(-cnt // S), items_group, items_tok)
        self._resize_tokens(cap)
        P = int(self._num_pages.max())
        # page headroom too: the first add() then writes in place, so tables keep their storage (a captured
        # search graph stays valid; without it every layer re-captured at its first window flush)
        self._grow_pages(P + max(16, P // 8))
        pids = torch.arange(P, device=dev).expand(BH, P)
        return self._layout(torch.where(pids < self._num_pages[:, None], pids, PAD))

    # ---------------------------------------------------------------- leaves
    def _fill(self, g_row: torch.Tensor, g_cell: torch.Tensor, g_exist: torch.Tensor, g_nexist: torch.Tensor,
              g_q: torch.Tensor, it_group: torch.Tensor, it_tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re)write groups of tokens into evenly filled, projection-sorted pages.

        Group g (a whole cell, or one leaf being split) of row ``g_row[g]`` in cell ``g_cell[g]`` holds every
        item with ``it_group == g``; it is cut into ``g_q[g]`` pieces (``g_nexist[g] <= g_q[g] <= size``). Piece
        j reuses page ``g_exist[g, j]`` for ``j < g_nexist[g]``, later pieces get new ids (per row, in group
        order). Returns (rows, pages) of every written page.
        """
        dev = g_row.device
        G = g_row.numel()
        it_row = g_row[it_group]
        proj0 = self._proj[it_row, it_tok, 0]
        o1 = torch.argsort(proj0, stable=True)
        o2 = torch.argsort(it_group[o1], stable=True)
        order = o1[o2]
        grp, tok, row = it_group[order], it_tok[order], it_row[order]
        cnt = torch.bincount(it_group, minlength=G)
        pos = _segment_pos(grp)
        q = g_q.clamp(min=1)
        base, extra = cnt // q, cnt % q
        b_, e_ = base[grp], extra[grp]
        thr = e_ * (b_ + 1)
        big = pos < thr
        bsafe = b_.clamp(min=1)
        piece = torch.where(big, pos // (b_ + 1), e_ + (pos - thr) // bsafe)
        slot = torch.where(big, pos % (b_ + 1), (pos - thr) % bsafe)
        size = b_ + (piece < e_).to(torch.int64)

        # new page ids: per row, consecutive over the row's groups in group order
        n_new = (g_q - g_nexist).clamp(min=0)
        go = torch.argsort(g_row, stable=True)
        ex = n_new[go].cumsum(0) - n_new[go]
        seg = _segment_pos(g_row[go])
        first_ex = ex[torch.arange(G, device=dev) - seg]
        new_base = torch.empty_like(n_new)
        new_base[go] = self._num_pages[g_row[go]] + ex - first_ex
        self._num_pages.index_add_(0, g_row, n_new)
        self._grow_pages(int(self._num_pages.max()))

        nex = g_nexist[grp]
        E = g_exist.shape[1]
        reuse = piece < nex
        old_id = g_exist[grp, piece.clamp(max=max(E - 1, 0))] if E else torch.full_like(piece, PAD)
        pid = torch.where(reuse, old_id, new_base[grp] + piece - nex)

        # clear the reused pages, then write every token
        ev = g_exist >= 0
        if bool(ev.any()):
            er = g_row[:, None].expand_as(g_exist)[ev]
            self._page_tok[er, g_exist[ev]] = PAD
        self._page_tok[row, pid, slot] = tok
        self._page_len[row, pid] = size
        self._tok_page[row, tok] = pid
        self._tok_slot[row, tok] = slot

        # append the new pages to their cell's page list and to the subtree counts up the tree
        first = slot == 0
        newp = first & ~reuse
        nr, nc, npid = row[newp], g_cell[grp][newp], pid[newp]
        if npid.numel():
            C = self._cell_pages.shape[1]
            key = nr * C + nc
            ko = torch.argsort(npid, stable=True)
            ko = ko[torch.argsort(key[ko], stable=True)]
            nr, nc, npid, key = nr[ko], nc[ko], npid[ko], key[ko]
            at = self._cell_npages[nr, nc] + _segment_pos(key)
            self._grow_cell_pages(int(at.max()) + 1)
            self._cell_pages[nr, nc, at] = npid
            ones = torch.ones_like(npid)
            self._cell_npages.index_put_((nr, nc), ones, accumulate=True)
            self._add_subtree(nr, nc, ones)
        return row[first], pid[first]

    def _ancestors(self) -> torch.Tensor:
        """Each cell, then its parent cell, and so on up to the root, PAD above: [BH, C, L+1]. Centres and their
        parents never change after build (``add`` puts new tokens on level 0), so neither does this table."""
        BH, C = self._subtree.shape
        rows = torch.arange(BH, device=self._subtree.device)[:, None]
        cur = torch.arange(C, device=rows.device).expand(BH, C)
        chain = [cur]
        for _ in range(self._L):
            tok = self._cell_tok[cur.clamp(min=0)]
            up = self._parent[rows, tok.clamp(min=0)]
            cur = torch.where((cur >= 0) & (tok >= 0), up, torch.full_like(cur, PAD))
            chain.append(cur)
        return torch.stack(chain, -1)

    def _add_subtree(self, rows: torch.Tensor, cells: torch.Tensor, counts: torch.Tensor) -> None:
        """Add ``counts`` pages to the subtree page count of each cell and of all its ancestors: one scatter
        over the precomputed ancestor chains (PAD entries add 0 to cell 0; no boolean indexing, no sync)."""
        anc = self._cell_anc[rows, cells.clamp(min=0)]  # [n, L+1]
        ok = (anc >= 0) & (cells >= 0)[:, None]
        val = torch.where(ok, counts[:, None], torch.zeros_like(anc))
        self._subtree.index_put_((rows[:, None].expand_as(anc), anc.clamp(min=0)), val, accumulate=True)

    def _layout(self, page_ids: torch.Tensor) -> PageLayout:
        """Layout of the given pages: page_ids [BH, M] PAD-padded."""
        B, H, S = self._B, self._H, self._S
        BH, Mx = page_ids.shape
        self._min_pages = int(self._num_pages.min()) if BH else 0
        rows = torch.arange(BH, device=page_ids.device)[:, None]
        valid = page_ids >= 0
        tids = self._page_tok[rows, page_ids.clamp(min=0)] if Mx else page_ids.new_empty((BH, 0, S))
        tids = torch.where(valid[..., None], tids, torch.full_like(tids, PAD))
        return PageLayout(
            page_ids=page_ids.reshape(B, H, Mx).clone(),
            token_ids=tids.reshape(B, H, Mx, S).clone(),
            lengths=(tids >= 0).sum(-1).to(torch.int32).reshape(B, H, Mx),
            num_pages=self._num_pages.reshape(B, H).clone(),
            num_tokens=self._n,
        )

    # ---------------------------------------------------------------- add
    def add(self, keys: torch.Tensor) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, n, D]")
        if self._keys is None:
            raise RuntimeError("DCITreeIndex.add() before build()")
        B, H, D = self._B, self._H, self._D
        if keys.shape[0] != B or keys.shape[1] != H or keys.shape[3] != D:
            raise ValueError(f"keys shape {tuple(keys.shape)} does not match the index [B={B}, Hkv={H}, n, D={D}]")
        n = keys.shape[2]
        BH, S, dev = B * H, self._S, self._dev
        if n == 0:
            return self._layout(torch.full((BH, 0), PAD, dtype=torch.int64, device=dev))
        t0, t1 = self._n, self._n + n
        self._grow_tokens(t1)
        kd = keys.detach().to(dev, self._keys.dtype).reshape(BH, n, D)
        self._keys[:, t0:t1] = kd  # (keys_on_host: a copy to the host, in the insertion job)
        kf = kd.float()
        sq = self._sqnorm(kf)
        self._sq[:, t0:t1] = sq
        self._tok_level[t0:t1] = 0
        self._tok_cell[t0:t1] = PAD
        M = torch.maximum(self._M, sq.amax(-1))  # [BH]
        self._M = M
        self._proj[:, t0:t1] = self._project(kf, sq, M)
        new_tok = torch.arange(t0, t1, device=dev).expand(BH, n)
        rows = torch.arange(BH, device=dev)[:, None].expand(BH, n)

        # parent: the nearest level-1 centre (exact), or the root while the tree has a single level
        if self._L >= 2:
            par = self._c1_cell[self._nearest(kf, sq, self._c1_keys, self._c1_sq, M)]
        else:
            par = torch.zeros((BH, n), dtype=torch.int64, device=dev)
        self._parent[:, t0:t1] = par
        self._cell_size.index_put_((rows, par), torch.ones_like(par), accumulate=True)
        self._n = t1

        # whole-cell groups: cells projected with an older M (re-projected) or still empty; the rest: leaf inserts
        C = self._cell_pages.shape[1]
        whole = (self._cell_M[rows, par] < M[:, None]) | (self._cell_npages[rows, par] == 0)
        ckey = torch.unique(rows[whole] * C + par[whole])  # sorted (row, cell)
        c_row, c_cell = ckey // C, ckey % C
        c_exist = self._cell_pages[c_row, c_cell]  # [Gc, Cc]
        c_nexist = self._cell_npages[c_row, c_cell]
        Gc = ckey.numel()
        m_group, m_tok = self._page_members(c_row, c_exist)  # existing members of those cells
        if m_tok.numel():  # re-project them with the new M
            m_row = c_row[m_group]
            km = self._gather_keys(m_row * self._keys.shape[1] + m_tok)
            self._proj[m_row, m_tok] = self._project(km[None], self._sq[m_row, m_tok][None], M[m_row][None])[0]
        self._cell_M[c_row, c_cell] = M[c_row]
        w_group = torch.searchsorted(ckey, rows[whole] * C + par[whole])
        w_tok = new_tok[whole]

        # leaf inserts: route each token to the leaf of its cell with the largest first key <= its projection
        lr, lc, lt = rows[~whole], par[~whole], new_tok[~whole]
        Pc = self._page_tok.shape[1]
        if lt.numel():
            pages = self._cell_pages[lr, lc]  # [Nl, Cc]
            ftok = self._page_tok[lr[:, None], pages.clamp(min=0), 0]
            first = self._proj[lr[:, None], ftok.clamp(min=0), 0]
            first = torch.where(pages >= 0, first, torch.full_like(first, float("inf")))
            le = first <= self._proj[lr, lt, 0][:, None]
            below = torch.where(le, first, torch.full_like(first, _NEG_INF)).argmax(-1)
            tgt = torch.where(le.any(-1), below, first.argmin(-1))
            tpid = pages.gather(1, tgt[:, None])[:, 0]
        else:
            tpid = lt
        lkey = torch.unique(lr * Pc + tpid)  # sorted (row, page)
        l_row, l_pid = lkey // Pc, lkey % Pc
        l_cell = self._parent[l_row, self._page_tok[l_row, l_pid, 0]]
        lo_group, lo_tok = self._page_members(l_row, l_pid[:, None])
        ln_group = torch.searchsorted(lkey, lr * Pc + tpid)

        # one fill over all groups (rows interleave; _fill allocates new ids per row in group order)
        E = max(c_exist.shape[1], 1)
        exist = torch.full((Gc + lkey.numel(), E), PAD, dtype=torch.int64, device=dev)
        exist[:Gc, : c_exist.shape[1]] = c_exist
        exist[Gc:, 0] = l_pid
        g_row = torch.cat([c_row, l_row])
        g_nexist = torch.cat([c_nexist, torch.ones_like(l_pid)])
        it_group = torch.cat([m_group, w_group, Gc + lo_group, Gc + ln_group])
        it_tok = torch.cat([m_tok, w_tok, lo_tok, lt])
        cnt = torch.bincount(it_group, minlength=g_row.numel())
        g_q = torch.maximum(g_nexist, -(-cnt // S))
        wr, wp = self._fill(g_row, torch.cat([c_cell, l_cell]), exist, g_nexist, g_q, it_group, it_tok)

        # the dirty pages, per row
        Pc = self._page_tok.shape[1]
        key = torch.unique(wr * Pc + wp)
        r_, p_ = key // Pc, key % Pc
        width = int(torch.bincount(r_, minlength=BH).max())
        ids = torch.full((BH, width), PAD, dtype=torch.int64, device=dev)
        ids[r_, _segment_pos(r_)] = p_
        return self._layout(ids)

    def _page_members(self, g_row: torch.Tensor, g_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of the pages of each group: g_pages [G, m] PAD-padded -> (group of each token, token)."""
        G, m = g_pages.shape
        if G == 0 or m == 0:
            e = torch.zeros(0, dtype=torch.int64, device=g_pages.device)
            return e, e
        t = self._page_tok[g_row[:, None], g_pages.clamp(min=0)]  # [G, m, S]
        t = torch.where((g_pages >= 0)[..., None], t, torch.full_like(t, PAD)).flatten(1)
        ok = t >= 0
        grp = torch.arange(G, device=t.device)[:, None].expand_as(t)
        return grp[ok], t[ok]

    # ---------------------------------------------------------------- search
    def _params(self, params: SearchParams | None) -> tuple[int, float, float]:
        fov = self.field_of_view
        pr, pv = self.prop_to_retrieve, self.prop_to_visit
        if params is not None:
            if params.field_of_view is not None:
                if isinstance(params.field_of_view, bool) or not isinstance(params.field_of_view, int) or \
                        params.field_of_view < 1:
                    raise ValueError(f"field_of_view must be an int >= 1, got {params.field_of_view!r}")
                fov = params.field_of_view
            if params.prop_to_retrieve is not None:
                pr = self._check_prop("prop_to_retrieve", params.prop_to_retrieve)
            if params.prop_to_visit is not None:
                pv = self._check_prop("prop_to_visit", params.prop_to_visit)
        if fov is None:
            fov = max(int(self.fov_ratio * self._n), self.min_field_of_view)
        return fov, pr, pv

    def _check_queries(self, queries: torch.Tensor) -> int:
        check_tensor("queries", queries, 3, dims="[B, Hq, D]")
        if self._keys is None:
            raise RuntimeError("DCITreeIndex.search() before build()")
        B, H, D = self._B, self._H, self._D
        if queries.shape[0] != B or queries.shape[-1] != D or queries.shape[1] % H or queries.shape[1] == 0:
            raise ValueError(f"queries shape {tuple(queries.shape)} is not [B={B}, Hq (multiple of Hkv={H}), D={D}]")
        return queries.shape[1] // H

    def _dense_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q . k for every token: q [BH, G, D] -> [BH, G, T] (one matmul, keys read in place)."""
        return torch.bmm(self._keys[:, : self._n].float(), q.transpose(1, 2)).transpose(1, 2)

    def _scan(self, q: torch.Tensor, pages: torch.Tensor, dense: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every token of the given pages exactly. q [BH, G, D] float, pages [BH, R] (PAD) ->
        (tokens [BH, R*S] PAD-padded, scores [BH, G, R*S] with -inf on padding).

        The keys of those tokens are gathered and multiplied, or, given ``dense`` scores of all tokens
        ([BH, G, T], see ``dense_scan_fraction``), the scores are picked from it: same numbers, less memory
        traffic once the pages cover a large part of the index."""
        BH, R = pages.shape
        S, D = self._S, self._D
        rows = torch.arange(BH, device=pages.device)[:, None]
        toks = self._page_tok[rows, pages.clamp(min=0)] if R else pages.new_empty((BH, 0, S))
        toks = torch.where((pages >= 0)[..., None], toks, torch.full_like(toks, PAD)).reshape(BH, R * S)
        valid = toks >= 0
        if dense is not None:
            s = dense.gather(-1, toks.clamp(min=0)[:, None].expand(BH, q.shape[1], R * S))
        else:
            flat = (rows * self._keys.shape[1] + toks.clamp(min=0)).reshape(-1)
            kk = self._gather_keys(flat).view(BH, R * S, D)
            s = torch.bmm(kk, q.transpose(1, 2)).transpose(1, 2)  # [BH, G, R*S]
        return toks, s.masked_fill(~valid[:, None], _NEG_INF)

    def _visit_mask(self, q: torch.Tensor, toks: torch.Tensor, nn: int, pr: float, pv: float) -> torch.Tensor | None:
        """Tokens a reference single-level scan would visit (projection pruning), or None when it visits all.

        In each cell of n members the reference visits ``v = min(n, roundup(max(nn, min(ceil(pv n),
        ceil(pr n))), scan_batch))`` points; we take the v closest to the query's projection (per query head,
        per direction; with several simple indices a token must be visited in all simple indices of some
        composite index). -> [BH, G, R*S] bool."""
        BH, N = toks.shape
        if N == 0 or min(pr, pv) >= 1.0:
            return None
        rows = torch.arange(BH, device=toks.device)[:, None]
        valid = toks >= 0
        t = toks.clamp(min=0)
        cells = torch.where(valid, self._parent[rows, t], torch.full_like(t, PAD))
        n = self._cell_size[rows, cells.clamp(min=0)]
        want = torch.maximum(torch.full_like(n, nn), torch.minimum(torch.ceil(pv * n.double()).long(),
                                                                    torch.ceil(pr * n.double()).long()))
        b = self.scan_batch
        v = torch.minimum(n, -(-want // b) * b)
        if not bool(((v < n) & valid).any()):
            return None
        G = q.shape[1]
        qn = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        qp = qn @ self._u[:, : self._D].T  # [BH, G, nd]
        tp = self._proj[rows, t]  # [BH, N, nd]
        delta = (tp[:, None] - qp[:, :, None]).abs()  # [BH, G, N, nd]
        delta = delta.masked_fill(~valid[:, None, :, None], float("inf"))
        cells_g = cells[:, None].expand(BH, G, N)
        ms, mc = self.num_simple, self.num_composite
        visited = []
        for j in range(ms * mc):
            o1 = delta[..., j].argsort(dim=-1, stable=True)
            o2 = cells_g.gather(-1, o1).argsort(dim=-1, stable=True)
            order = o1.gather(-1, o2)
            rank = torch.empty_like(order).scatter_(-1, order, _segment_pos(cells_g.gather(-1, order)))
            visited.append(rank < v[:, None])
        vis = torch.stack(visited, -1).view(BH, G, N, mc, ms).all(-1).any(-1)
        return vis & valid[:, None]

    def search(self, queries: torch.Tensor, k: int, *, params: SearchParams | None = None) -> Selection:
        G = self._check_queries(queries)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        B, H, D = self._B, self._H, self._D
        BH, dev = B * H, self._dev
        fov, pr, pv = self._params(params)
        q = queries.detach().to(dev).float().reshape(BH, G, D)
        if self._n == 0 or k == 0:
            return Selection(page_ids=torch.full((B, H, 0), PAD, dtype=torch.int64, device=dev))
        if self._L <= 1 or k >= self._min_pages:  # exhaustive: exact ranking of every page
            self._last_scanned = torch.full((BH,), self._n, dtype=torch.int64, device=dev)
            return Selection(page_ids=gqa_merge(self._exact_ranking(q, k).view(B, H, G, -1), k))
        masked = self._masked(pr, pv)
        if self._host_keys and not masked:
            raise ValueError("keys_on_host runs the masked search only; prop_to_retrieve/prop_to_visit < 1 need "
                             "the 'beam' search, which reads the keys on the index's device")
        if masked and min(pr, pv) < 1.0:
            raise ValueError("search_mode='masked' scans whole cells; prop_to_retrieve/prop_to_visit < 1 need 'beam'")
        if masked:
            if self.cuda_graphs and dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                return Selection(page_ids=self._graph_search(q, k, fov).clone())
            # (inside a caller's capture, see capture_key: the same work, recorded into the caller's graph)
            return Selection(page_ids=self._masked_merged(q, k, torch.full((), fov, device=dev)))
        ids = self._search_beam(q, k, fov, pr, pv)
        short = self._short(ids, k)
        if bool(short.any()):
            ids = self._fallback(ids, self._exact_ranking(q, k), short)
        return Selection(page_ids=gqa_merge(ids.view(B, H, G, -1), k))

    def _masked(self, pr: float, pv: float) -> bool:
        return self.search_mode == "masked" or (
            self.search_mode == "auto" and min(pr, pv) >= 1.0 and (self._dev.type == "cuda" or self.keys_on_host)
        )

    def _tables(self) -> tuple[torch.Tensor, ...]:
        """The tables the masked search reads (``add`` updates them in place until it reallocates one)."""
        return (self._keys, self._parent, self._tok_page, self._tok_cell, self._page_len, self._subtree,
                self._num_pages, self._page_tok)

    def capture_key(self, k: int, params: SearchParams | None = None) -> tuple | None:
        """The masked search on CUDA is capturable (no host sync, fixed shapes); the exhaustive path is not
        offered. The key pins the tables' storage, ``k`` and the field of view (which grows with the context)."""
        if self._keys is None or self._dev.type != "cuda" or self._n == 0 or k == 0:
            return None
        fov, pr, pv = self._params(params)
        if self._L <= 1 or k >= self._min_pages or not self._masked(pr, pv) or min(pr, pv) < 1.0:
            return None
        return storage_key(*self._tables()) + (k, fov, self._B, self._H)

    def _short(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """(row, head) pairs whose descent found fewer than min(k, pages) pages (tiny trees): [BH, G] bool."""
        return (ids >= 0).sum(-1) < torch.clamp(self._num_pages, max=k)[:, None]

    @staticmethod
    def _fallback(ids: torch.Tensor, full: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """Take the exhaustive ranking ``full`` for the ``short`` (row, head) pairs. -> [BH, G, full width]"""
        width = full.shape[-1]
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=PAD)[..., :width]
        return torch.where(short[..., None], full, ids)

    def _masked_merged(self, q: torch.Tensor, k: int, fov: torch.Tensor) -> torch.Tensor:
        """Masked descent, fallback and GQA merge without a host sync: q [BH, G, D], fov 0-dim -> [B, Hkv, k']."""
        ids, full = self._search_masked(q, k, fov)
        ids = self._fallback(ids, full, self._short(ids, k))
        return gqa_merge(ids.view(self._B, self._H, q.shape[1], -1), k)

    def _graph_search(self, q: torch.Tensor, k: int, fov: int) -> torch.Tensor:
        """``_masked_merged`` replayed from a CUDA graph: capture once per (tables, G, k), then one launch per
        search. The tables are updated in place by ``add``; a reallocation (capacity growth, build) changes the key
        and triggers a new capture."""
        key = storage_key(*self._tables()) + (q.shape, k)
        if self._graph is None or self._graph[0] != key:
            sq, sf = q.clone(), torch.tensor(fov, device=q.device)
            side = torch.cuda.Stream(device=q.device)
            side.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.stream(side):
                self._masked_merged(sq, k, sf)  # warm-up outside the graph
            torch.cuda.current_stream(q.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with capture_lock, torch.cuda.graph(graph, capture_error_mode="thread_local"):  # no job meanwhile
                out = self._masked_merged(sq, k, sf)
            self._graph = (key, graph, sq, sf, out)
        _, graph, sq, sf, out = self._graph
        sq.copy_(q)
        sf.fill_(fov)
        graph.replay()
        return out

    def _search_beam(self, q: torch.Tensor, k: int, fov: int, pr: float, pv: float) -> torch.Tensor:
        """Beam descent that gathers and scores only the pages of the frontier cells. q [BH, G, D] ->
        ranked page ids per query head [BH, G, k'] (PAD-padded)."""
        BH, G = q.shape[:2]
        dev = q.device
        rows = torch.arange(BH, device=dev)[:, None]
        frontier = torch.zeros((BH, 1), dtype=torch.int64, device=dev)  # the root cell
        seen_pages, seen_scores = [], []
        dense = None
        self._last_scanned = torch.zeros(BH, dtype=torch.int64, device=dev)
        for child in range(self._L - 1, -1, -1):
            cp = self._cell_pages[rows, frontier.clamp(min=0)]  # [BH, W, Cc]
            cp = torch.where((frontier >= 0)[..., None], cp, torch.full_like(cp, PAD)).flatten(1)
            pages = _compact(cp, cp >= 0)  # [BH, R]
            if dense is None and pages.shape[1] * self._S > self.dense_scan_fraction * self._n:
                dense = self._dense_scores(q)
            toks, s = self._scan(q, pages, dense)
            self._last_scanned += (toks >= 0).sum(-1)
            mask = self._visit_mask(q, toks, fov if child >= 1 else k, pr, pv)
            if mask is not None:
                s = s.masked_fill(~mask, _NEG_INF)
            R = pages.shape[1]
            seen_pages.append(pages)
            seen_scores.append(s.view(BH, G, R, self._S).amax(-1) if R else s.new_empty((BH, G, 0)))
            if child == 0:
                break
            # next frontier: per query head the best max(min(F, found), k') centres; union over the GQA group
            valid = toks >= 0
            cells = torch.where(valid, self._tok_cell[toks.clamp(min=0)], torch.full_like(toks, PAD))
            sub = torch.where(cells >= 0, self._subtree[rows, cells.clamp(min=0)], torch.zeros_like(cells))
            keep, order = self._beam_keep(s, sub, k, fov)
            W = int(keep.sum(-1).max()) if keep.numel() else 0
            pick = cells[:, None].expand_as(order).gather(-1, order[..., :W])
            pick = torch.where(keep[..., :W], pick, torch.full_like(pick, PAD))
            frontier = _unique_rows(pick.reshape(BH, G * W))
            if frontier.shape[1] == 0:
                break
        pages = torch.cat(seen_pages, 1)
        scores = torch.cat(seen_scores, -1)
        pos, _ = topk_ids(scores, k)  # [BH, G, k']
        ids = pages[:, None].expand(BH, G, pages.shape[1]).gather(-1, pos.clamp(min=0))
        return torch.where(pos >= 0, ids, torch.full_like(ids, PAD))

    @staticmethod
    def _beam_keep(s: torch.Tensor, sub: torch.Tensor, k: int, fov: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which scanned centres each query head keeps: the best ``max(min(F, found), k')`` (``k'``: the shortest
        prefix whose subtrees hold ``k`` pages). s [BH, G, N] scores (-inf: not scanned), sub [BH, N] pages
        under each centre -> (keep [BH, G, N] bool in sorted order, order [BH, G, N])."""
        ss, order = s.sort(dim=-1, descending=True, stable=True)
        found = (ss > _NEG_INF).sum(-1)  # [BH, G]
        cum = sub[:, None].expand_as(order).gather(-1, order).cumsum(-1)
        kprime = (cum < k).sum(-1) + 1
        keep_n = torch.minimum(torch.maximum(torch.clamp(found, max=fov), kprime), found)
        return torch.arange(s.shape[-1], device=s.device) < keep_n[..., None], order

    def _search_masked(self, q: torch.Tensor, k: int, fov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same descent (same frontier rule, GQA union, cumulative page scores) in fixed shapes: one dense
        ``K q^T``, then per upper level a small sort over that level's centres, and one masked page max.
        No gathers of keys, no data-dependent shapes (no host synchronisation). q [BH, G, D] -> (ranked ids
        [BH, G, k'], the exhaustive ranking from the same scores for rows whose descent finds too few pages)."""
        BH, G = q.shape[:2]
        fused = self._host_keys or (
            (q.is_cuda and triton_available()) if self.fused_scores is None else self.fused_scores)
        if fused:  # centres scored from their own copy; page maxima by one kernel through the page table (below)
            def centre_scores(lvl: int) -> torch.Tensor:  # -> [BH, G, Nc]
                return torch.bmm(self._level_keys[lvl], q.transpose(1, 2)).transpose(1, 2)
        else:
            # every token slot of the capacity: shapes stay fixed across add(); empty slots have page PAD (never
            # ranked) and parent PAD (clamped to the root, harmless: they hold no page)
            dense = torch.bmm(self._keys.float(), q.transpose(1, 2)).transpose(1, 2)  # [BH, G, T*]

            def centre_scores(lvl: int) -> torch.Tensor:
                return dense[:, :, self._level_tok[lvl]]
        parent = self._parent.clamp(min=0)  # [BH, T*] cell holding each token
        front = torch.zeros_like(self._subtree, dtype=torch.bool)  # [BH, C] cells whose pages are scanned
        front[:, 0] = True  # the root
        for child in range(self._L - 1, 0, -1):
            idx = self._level_tok[child]  # [Nc] centres on this level
            ok = front.gather(1, parent[:, idx])  # [BH, Nc] in a scanned cell
            s = centre_scores(child).masked_fill(~ok[:, None], _NEG_INF)  # [BH, G, Nc]
            cells = self._tok_cell[idx].expand(BH, -1)  # [BH, Nc] the cell each centre owns
            keep, order = self._beam_keep(s, self._subtree.gather(1, cells), k, fov)
            picked = torch.where(keep, cells[:, None].expand_as(order).gather(-1, order), 0)  # 0: root, already set
            front.scatter_(1, picked.reshape(BH, -1), True)
        # every page lies in one cell, so a page is scanned iff its cell is: one page max serves both rankings
        P = self._page_len.shape[1]
        page_cell = parent.gather(1, self._page_tok[:, :, 0].clamp(min=0))  # [BH, P*]
        seen = front.gather(1, page_cell)  # [BH, P*]
        if fused:
            # only the scanned pages are read, unless the descent finds too few of them (see _short: the
            # exhaustive ranking below then needs every page of that row)
            live = torch.arange(P, device=seen.device) < self._num_pages[:, None]
            short = (seen & live).sum(-1) < torch.clamp(self._num_pages, max=k)  # [BH]
            ps = self._page_maxima(q, seen | short[:, None])
        else:
            tp = self._tok_page[:, None].expand(BH, G, -1)
            ps = page_max_scores(dense.reshape(1, BH * G, -1), tp.reshape(1, BH * G, -1), P).view(BH, G, P)
        self._last_scanned = (self._page_len * seen).sum(-1)
        return topk_ids(ps.masked_fill(~seen[:, None], _NEG_INF), k)[0], topk_ids(ps, k)[0]

    def _exact_ranking(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Every page ranked by its best token: q [BH, G, D] -> ids [BH, G, min(k, P*)]. With the keys on the
        host, the fused kernel reads them through the page table (no device copy of the key store)."""
        if self._host_keys:
            return topk_ids(self._page_maxima(q), k)[0]
        return self._rank_pages(self._dense_scores(q), k)

    def _page_maxima(self, q: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        """Best token score of each page by the fused kernel, keys read in place through the page table:
        q [BH, G, D] float32, load [BH, P*] bool (pages to read; None: all) -> [BH, G, P*]."""
        from kvpolicy_kernels.page_scores import token_page_scores

        return token_page_scores(q.contiguous(), self._keys[:, None], self._page_tok[:, None],
                                 None if load is None else load[:, None])

    def _rank_pages(self, s: torch.Tensor, k: int) -> torch.Tensor:
        """Pages ranked by their best token score. s [BH, G, n] (-inf: not scanned) -> ids [BH, G, min(k, P*)]
        (P* the page capacity; pages never scanned come back PAD)."""
        BH, G, n = s.shape  # n: tokens, or the token capacity (masked search)
        P = self._page_len.shape[1]
        tp = self._tok_page[:, None, :n].expand(BH, G, n)
        ps = page_max_scores(s.reshape(1, BH * G, n), tp.reshape(1, BH * G, n), P).view(BH, G, P)
        return topk_ids(ps, k)[0]

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError unless the internal structure is consistent (used by tests)."""
        if self._keys is None:
            return
        BH, n, S = self._keys.shape[0], self._n, self._S
        rows = torch.arange(BH, device=self._dev)[:, None]
        tp, ts = self._tok_page[:, :n], self._tok_slot[:, :n]
        if bool((tp < 0).any()) or bool((tp >= self._num_pages[:, None]).any()):
            raise ValueError("a token has no page or a page id beyond num_pages")
        back = self._page_tok[rows, tp, ts]
        if not torch.equal(back, torch.arange(n, device=back.device).expand(BH, n)):
            raise ValueError("token -> (page, slot) map disagrees with the page contents")
        P = self._page_tok.shape[1]
        live = torch.arange(P, device=rows.device) < self._num_pages[:, None]
        cnt = (self._page_tok >= 0).sum(-1)
        if bool((cnt[live] < 1).any()) or bool((cnt[~live] != 0).any()):
            raise ValueError("an index page is empty, or a page beyond num_pages holds tokens")
        if not torch.equal(cnt[live], self._page_len[live]):
            raise ValueError("page lengths disagree with page contents")
        if int(cnt.sum()) != BH * n:
            raise ValueError("pages hold a token twice")
        filled = torch.arange(S, device=rows.device) < cnt[..., None]
        if not torch.equal(filled, self._page_tok >= 0):
            raise ValueError("pages must be filled from slot 0 without holes")
        pt = self._page_tok.clamp(min=0)
        pr = self._proj[rows[..., None], pt, 0]
        if S > 1 and bool(((pr[..., 1:] < pr[..., :-1]) & filled[..., 1:]).any()):
            raise ValueError("a page is not sorted by projection")
        cell_of_page = self._parent[rows, self._page_tok[..., 0].clamp(min=0)]
        same = self._parent[rows[..., None], pt] == cell_of_page[..., None]
        if bool((~same & filled).any()):
            raise ValueError("a page mixes tokens of two cells")
        cp = self._cell_pages
        listed = torch.zeros_like(live)
        ok = cp >= 0
        rr = rows[..., None].expand_as(cp)
        listed[rr[ok], cp[ok]] = True
        if not torch.equal(listed, live) or int(ok.sum()) != int(self._num_pages.sum()):
            raise ValueError("cell page lists do not cover every page exactly once")
        cells = torch.arange(cp.shape[1], device=rows.device).expand(cp.shape[:2])[..., None].expand_as(cp)
        if bool((cell_of_page[rr[ok], cp[ok]] != cells[ok]).any()):
            raise ValueError("a page is listed under the wrong cell")
        if not torch.equal(self._subtree[:, 0], self._num_pages):
            raise ValueError("root subtree page count differs from the number of pages")
