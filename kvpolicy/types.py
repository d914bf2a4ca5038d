"""Result and context types passed between the four policy parts.

Every result is a frozen dataclass with fixed tensor shapes. Page ids are *logical* ids that belong to one
(batch row, KV head) of one layer; ``-1`` pads rows that hold fewer entries.

Vocabulary (DESIGN.md §2): B batch, Hq query heads, Hkv KV heads, T tokens, D head dim, S page size,
P pages of one (layer, KV head), K pages selected, N GPU slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvpolicy.interfaces import Index
    from kvpolicy.pool import PagePool

__all__ = [
    "Budget",
    "PageLayout",
    "Reservation",
    "SearchParams",
    "SelectContext",
    "Selection",
    "TransferHandle",
]

PAD = -1  # page id / token id padding value


@dataclass(frozen=True)
class Budget:
    """A token budget resolved into pages: ``tokens = (sink + window + retrieved) * page_size``.

    ``retrieved_pages`` is ``None`` for an unlimited budget (every page of the index is attended).
    """

    page_size: int
    sink_pages: int
    window_pages: int
    retrieved_pages: int | None

    @property
    def unlimited(self) -> bool:
        return self.retrieved_pages is None

    @property
    def pages(self) -> int | None:
        if self.retrieved_pages is None:
            return None
        return self.sink_pages + self.window_pages + self.retrieved_pages

    @property
    def tokens(self) -> int | None:
        pages = self.pages
        return None if pages is None else pages * self.page_size

    @property
    def sink_tokens(self) -> int:
        return self.sink_pages * self.page_size

    @property
    def window_tokens(self) -> int:
        return self.window_pages * self.page_size

    def describe(self) -> str:
        if self.unlimited:
            return "unlimited"
        return (
            f"{self.tokens} tokens = {self.pages} pages x {self.page_size} "
            f"({self.sink_pages} sink + {self.window_pages} window + {self.retrieved_pages} retrieved)"
        )


@dataclass(frozen=True)
class PageLayout:
    """How an index grouped (some of) one layer's keys into pages.

    After ``Index.build`` the layout lists every page; after ``Index.add`` it lists only the pages that are
    new or whose contents changed ("dirty"): their device copies must be refreshed.

    Token ids are *index-local*: the i-th key ever given to the index (build, then each add) has id i.
    """

    page_ids: torch.Tensor  # [B, Hkv, M] int64, PAD-padded: pages described here
    token_ids: torch.Tensor  # [B, Hkv, M, S] int64, PAD-padded: index-local token ids in each page
    lengths: torch.Tensor  # [B, Hkv, M] int32: valid tokens per page (0 for padding rows)
    num_pages: torch.Tensor  # [B, Hkv] int64: pages in the index after this operation
    num_tokens: int  # tokens in the index after this operation (same for every (b, h))

    @property
    def page_size(self) -> int:
        return self.token_ids.shape[-1]

    def validate(self) -> None:
        """Raise ValueError unless shapes and padding are consistent (used by tests and conformance)."""
        B, H, M = self.page_ids.shape
        if self.token_ids.shape[:3] != (B, H, M):
            raise ValueError(f"token_ids shape {tuple(self.token_ids.shape)} does not match page_ids {(B, H, M)}")
        if self.lengths.shape != (B, H, M):
            raise ValueError(f"lengths shape {tuple(self.lengths.shape)} does not match page_ids {(B, H, M)}")
        counted = (self.token_ids >= 0).sum(-1)
        if not torch.equal(counted.to(self.lengths.dtype), self.lengths):
            raise ValueError("lengths disagree with the number of valid token ids per page")
        if bool(((self.page_ids < 0) & (self.lengths > 0)).any()):
            raise ValueError("a padding page row holds tokens")


@dataclass(frozen=True)
class Selection:
    """Pages each (batch row, KV head) attends to at one step, besides its sink and recent window.

    Rows are unique and PAD-padded at the end; ``page_ids.shape[-1]`` is at most the retrieved-page budget (or the
    selector's ``max_pages_per_head`` of it, see ``Selector``).
    """

    page_ids: torch.Tensor  # [B, Hkv, K] int64, PAD-padded
    scores: torch.Tensor | None = None  # [B, Hkv, K] float32, optional, selector-defined (higher = better)

    @property
    def k(self) -> int:
        return self.page_ids.shape[-1]

    @property
    def valid(self) -> torch.Tensor:
        return self.page_ids >= 0  # [B, Hkv, K] bool

    def validate(self, num_pages: torch.Tensor | None = None) -> None:
        """Raise ValueError unless ids are in range, unique per row and padded only at the end."""
        ids = self.page_ids
        if ids.dim() != 3:
            raise ValueError(f"Selection.page_ids must be [B, Hkv, K], got shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            raise ValueError(f"Selection.page_ids must be int64, got {ids.dtype}")
        if bool((ids < PAD).any()):
            raise ValueError("Selection.page_ids holds ids below -1")
        valid = ids >= 0
        if ids.shape[-1] > 1 and bool((~valid[..., :-1] & valid[..., 1:]).any()):
            raise ValueError("Selection rows must be padded at the end only")
        if num_pages is not None and bool((ids >= num_pages.to(ids.device).unsqueeze(-1)).any()):
            raise ValueError("Selection.page_ids holds a page id beyond the index")
        if ids.shape[-1] > 1:
            srt = ids.sort(dim=-1).values
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
            if bool(dup.any()):
                raise ValueError("Selection rows must not repeat a page id")


@dataclass(frozen=True)
class Reservation:
    """Where the selected pages sit in the GPU slot pool (``PageAllocator.reserve``)."""

    page_ids: torch.Tensor  # [B, Hkv, K] int64: the selection, PAD-padded
    slots: torch.Tensor  # [B, Hkv, K] int64: GPU slot of each selected page, PAD where page is PAD
    missing: torch.Tensor  # [B, Hkv, K] bool: page must be copied into its slot before use
    evicted: torch.Tensor  # [B, Hkv, K] int64: page that previously held that slot and was dropped, PAD if none

    @property
    def num_missing(self) -> int:
        return int(self.missing.sum())


@dataclass
class TransferHandle:
    """An in-flight (or finished) page copy returned by ``Transfer.submit``."""

    num_pages: int | Any  # an int, or a 0-dim device tensor (a transfer that never reads back from the device)
    nbytes: int | Any
    event: Any = None  # torch.cuda.Event recorded after the copy on the copy stream, or None (already done)
    stream: Any = None  # the stream the copy ran on, or None
    pending: Any = None  # transfer-private work that ``wait`` finishes (e.g. the scatter into slots)


@dataclass(frozen=True)
class SearchParams:
    """Per-call search knobs; each index reads the ones it knows and ignores the rest."""

    field_of_view: int | None = None
    prop_to_retrieve: float | None = None
    prop_to_visit: float | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    gqa_merge: str | None = None  # None: "interleave"; see Index.gqa_merges and kvpolicy.ops.GQA_MERGES
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectContext:
    """Everything a selector may read at one (layer, step), besides the query."""

    layer: int
    step: int  # decode step, 0 for the first generated token
    budget: Budget
    seq_len: int  # tokens in the sequence, the current one included
    index: Index | None
    pool: PagePool  # the layer's CPU page pool (read only for selectors: read_pages/read_range; oracle reads it)
    num_pages: torch.Tensor  # [B, Hkv] int64 pages currently in the index
    num_kv_heads: int
    scaling: float = 1.0  # softmax scale of the model's attention (e.g. 1/sqrt(D))
    prev_selection: Selection | None = None  # the previous layer's selection at this step (layer reuse)
    search_params: SearchParams | None = None
    # prepare() only, for selectors with ``needs_prompt_queries``: the prompt's queries (RoPE applied) and the
    # prompt position of index-local token 0 (token i of the index is prompt position index_offset + i)
    prompt_queries: torch.Tensor | None = None  # [B, Hq, T, D]
    prompt_keys: torch.Tensor | None = None  # [B, Hkv, T, D] every prompt key (sink and window included)
    index_offset: int = 0
    max_pages: int | None = None  # num_pages.max() when the caller knows it on the host (saves a device read)

    @property
    def k(self) -> int:
        """Retrieved pages to select: the budget's, or every page for an unlimited budget."""
        if self.max_pages is not None:
            max_pages = self.max_pages
        else:
            max_pages = int(self.num_pages.max()) if self.num_pages.numel() else 0
        if self.budget.retrieved_pages is None:
            return max_pages
        return min(self.budget.retrieved_pages, max_pages)
