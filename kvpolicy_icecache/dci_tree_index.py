"""``dci_tree``: IceCache's multi-level DCI tree (M-DCI) as a batched, semantic page index.

One tree per (batch row, KV head), all of them processed together in tensor code (CPU or CUDA). The algorithm
follows the reference implementation (yuzhenmao/M-DCI ``src/dci.c``, ``src/btree_p.c``; yuzhenmao/IceCache
``infer_state.py``) as summarised in ``research/icecache.md`` §1.3 and §2; the tensor formulation and the
deviations listed in the modules of ``kvpolicy_icecache.dci_tree`` (build, insert, search) are ours.

Structure (every token lives on exactly one level; levels are shared by all heads, parents are per head)::

    level L-1   top points            members of the root cell
    level l>=1  centres               each owns a *cell*: its children on level l-1 (its nearest-centre set)
    level 0     ordinary tokens

Inside every cell (the root's included) the members are sorted by their projection on a random direction
``u in R^{D+1}`` and cut into leaves of at most ``S`` tokens, evenly filled; **each leaf is one KV page**. So a
page holds tokens that share their nearest centre and lie next to each other along ``u``. Measurements:
``docs/icecache.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Index
from kvpolicy.ops import GQA_MERGES, unique_storages
from kvpolicy_icecache.dci_tree.build import TreeBuild
from kvpolicy_icecache.dci_tree.insert import TreeInsert
from kvpolicy_icecache.dci_tree.mirror import TreeMirror
from kvpolicy_icecache.dci_tree.promotion import promotion_levels
from kvpolicy_icecache.dci_tree.search import TreeSearch

__all__ = ["DCITreeIndex", "promotion_levels"]


@dataclass(kw_only=True)
class DCITreeIndex(TreeBuild, TreeInsert, TreeSearch, TreeMirror, Index):
    """IceCache's DCI tree: semantic pages (leaves of per-cell projection-sorted lists) and a multi-level,
    field-of-view search over them. One tree per (batch row, KV head), all trees in one set of tensors.

    ``build`` (``kvpolicy_icecache.dci_tree.build``): levels by promotion (``ratio_1``, ``ratio_2``,
    ``random_promotion``, ``seed``), parents by exact nearest centre, pages by projection on the directions
    drawn from ``seed`` (``num_simple * num_composite`` of them; pages follow direction 0).
    ``add`` (``...dci_tree.insert``): new tokens under their nearest level-1 centre, B+-tree leaf splits; the
    changed pages are returned. ``search`` (``...dci_tree.search``): cumulative field-of-view descent
    (``field_of_view``, else ``max(int(fov_ratio * T), min_field_of_view)``), pruned per cell only when
    ``prop_to_retrieve``/``prop_to_visit`` < 1 (visits rounded up to ``scan_batch``); ``search_mode`` ``"beam"``
    or ``"masked"`` (same selections; ``"auto"``: masked on CUDA, beam on the CPU), the masked one replayed
    from a CUDA graph (``cuda_graphs``) with page maxima from a Triton kernel (``fused_scores``);
    ``dense_scan_fraction`` is where the beam search scores all keys at once instead of gathering them.
    ``keys_on_host``: on a CUDA ``device``, the key store stays in pinned CPU memory and the masked search reads
    only the scanned pages' keys. ``keys_in_pool`` (with ``keys_on_host``): once the layer attaches its CPU page
    pool (``attach_pool``: the pool's pages are this index's pages, slot for slot), the index drops its key store
    and reads the keys there (the page-score kernel reads the pool's chunks in place, fp8 pages dequantised; ``add``
    reads the keys of the tokens it re-projects from the pool), so the host holds the keys once. ``tables_on_host`` (with ``keys_on_host``): every table that grows with the
    tokens stays on the host too, and ``add`` runs there; the device keeps a *search mirror*, the few tables the
    masked search reads (int32 page table, page cells and lengths, subtree counts, centre keys and parents:
    about 2% of the layer's KV bytes at D = 128), refreshed for the pages each ``add`` changes
    (``kvpolicy_icecache.dci_tree.mirror``). Each module's docstring holds the algorithm and the deviations
    from the C code.

    Introspection: ``token_pages()``, ``parents()``, ``level_sizes``, ``last_scanned_fraction`` and
    ``validate()`` (raises ValueError if the structure is inconsistent).
    """

    name: ClassVar[str] = "dci_tree"
    supports_add: ClassVar[bool] = True
    prefers_full_build: ClassVar[bool] = True  # centres are fixed after build: a streamed prompt rebuilds the tree
    gqa_merges: ClassVar[tuple[str, ...]] = GQA_MERGES  # SearchParams.gqa_merge (kvpolicy_icecache.dci_tree.search)
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
    tables_on_host: bool = False
    keys_in_pool: bool = False
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
        if not isinstance(self.tables_on_host, bool):
            raise TypeError(f"tables_on_host must be a bool, got {type(self.tables_on_host).__name__}")
        if self.tables_on_host and not self.keys_on_host:
            raise ValueError("tables_on_host keeps the index's tables in host memory beside its keys: it needs "
                             "keys_on_host=True")
        if not isinstance(self.keys_in_pool, bool):
            raise TypeError(f"keys_in_pool must be a bool, got {type(self.keys_in_pool).__name__}")
        if self.keys_in_pool and not self.keys_on_host:
            raise ValueError("keys_in_pool reads the keys from the layer's pinned CPU pool with the kernel of the "
                             "keys_on_host search: it needs keys_on_host=True")
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
                     "_cell_tok", "_M", "_u", "_scratch", "_c1_cell", "_c1_keys", "_c1_sq", "_last_scanned",
                     "_page_cell", "_cell_anc", "_mirror"):
            setattr(self, name, None)
        self._keys: torch.Tensor | None = None  # [BH, T*, D] keys in the input dtype (pinned host: keys_on_host;
        #                                          None once an attached pool holds them: keys_in_pool)
        self._kdtype: torch.dtype | None = None  # the keys' dtype
        self._pool = None  # the layer's CPU PagePool the keys are read from (attach_pool)
        self._level_tok: list[torch.Tensor] = []  # token ids on each level (level 0 is not used)
        self._level_keys: list[torch.Tensor] = []  # [BH, N_l, D] float32 keys of each level's centres (level >= 1)
        self._level_par: list[torch.Tensor] = []  # [BH, N_l] cell holding each centre (level >= 1; search device)
        self._level_cell: list[torch.Tensor] = []  # [N_l] cell each centre owns (level >= 1; search device)
        self._sdev = torch.device(self.device)  # where search runs
        self._dev = self._sdev  # where the tables live and build/add run (the host after a tables_on_host build)
        self._host_keys = False  # the key store sits in pinned host memory (keys_on_host on a CUDA device)
        self._host_tables = False  # every growing table sits on the host too; search reads ``_mirror``
        self._min_pages = 0  # host copy of num_pages.min() (no sync on the search path)
        self._graph = None  # GraphCache of the masked search (kvpolicy.concurrency), made by its first replay
        self._n = 0
        self._S = 0
        self._B = self._H = self._D = 0
        self._L = 0  # number of levels


    def attach_pool(self, pool) -> bool:
        """With ``keys_in_pool`` and the keys on the host (a CUDA search): read keys from ``pool`` from now on and
        drop the key store (see ``Index.attach_pool``). Otherwise nothing changes (False)."""
        if not (self.keys_in_pool and self._host_keys) or self._sq is None:
            return False
        want = (self._B, self._H, self._S, self._D)
        got = (pool.batch_size, pool.num_kv_heads, pool.page_size, pool.head_dim)
        if got != want or pool.device.type != "cpu" or not pool.track_tokens:
            raise ValueError(f"attach_pool needs a CPU pool of this index's pages (B, Hkv, S, D) = {want} that "
                             f"tracks tokens, got {got} on {pool.device} (track_tokens={pool.track_tokens})")
        self._pool, self._keys = pool, None
        self._graph = None  # the captured search read the key store
        if self._mirror is not None:
            self._make_mirror()  # without the page table: the pool's pages need none
        return True

    # ---------------------------------------------------------------- state
    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def num_pages(self) -> torch.Tensor:
        if self._sq is None:
            return torch.zeros((0, 0), dtype=torch.int64)
        return self._num_pages.view(self._B, self._H).clone()

    @property
    def nbytes(self) -> int:
        if self._sq is None:
            return 0
        return sum(t.nbytes for t in self._tensors())

    @property
    def device_nbytes(self) -> int:
        """Bytes held on a non-CPU device (with ``keys_on_host``, everything but the key store)."""
        if self._sq is None:
            return 0
        return sum(t.nbytes for t in self._tensors() if t.device.type != "cpu")


    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor the index holds, each storage once (level 1's centre keys are ``_c1_keys``)."""
        return unique_storages(t for t in [
            self._keys, self._sq, self._proj, self._parent, self._tok_page, self._tok_slot, self._tok_level,
            self._tok_cell, self._page_tok, self._page_len, self._page_cell, self._cell_pages, self._cell_npages,
            self._cell_size, self._cell_M, self._subtree, self._cell_tok, self._M, self._num_pages, self._u,
            self._scratch, self._c1_cell, self._c1_keys, self._c1_sq, self._cell_anc, *self._level_keys[1:],
            *self._level_par[1:], *self._level_cell[1:], *(self._mirror or ()),
        ] if t is not None)
