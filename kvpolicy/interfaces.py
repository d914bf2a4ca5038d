"""The four pluggable parts of a policy: ``Index``, ``Selector``, ``PageAllocator``, ``Transfer``.

Each part is a small ABC whose methods are called directly on the decode path (pluggy is used only to
*discover* the classes, never in the loop). Implementations are keyword-only dataclasses: hyperparameters are
fields validated in ``__post_init__`` (``ValueError``, never ``assert``); per-call knobs travel in
``SearchParams``; the token budget travels in ``SelectContext``, so one instance can be swept over budgets.
Optional capabilities raise ``NotImplementedError`` naming the class.

Contracts are documented here once; implementations document only what they add.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from kvpolicy.ops import unique_storages
from kvpolicy.types import PageLayout, Reservation, SearchParams, SelectContext, Selection, TransferHandle

if TYPE_CHECKING:  # pragma: no cover
    from kvpolicy.pool import PagePool

__all__ = ["Index", "PageAllocator", "Part", "Selector", "Transfer"]


def _state_tensors(obj: object) -> list[torch.Tensor]:
    """Tensors among ``obj``'s attributes, in lists/tuples/dicts there, and one object level down; one per storage."""
    found: list[torch.Tensor] = []

    def visit(v: object, depth: int) -> None:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, depth)
        elif depth > 0 and hasattr(v, "__dict__") and not isinstance(v, type) and not callable(v):
            for x in vars(v).values():
                visit(x, depth - 1)

    for v in vars(obj).values():
        visit(v, 1)
    return unique_storages(found)


class Part(ABC):
    """Common base: a registered name, a kind, and the largest batch the part handles (None = any).

    ``shardable``: what the part decides for one KV head depends only on that head's keys, values and queries
    (its GQA group's query heads). Under tensor parallelism each rank holds a subset of the KV heads, and a
    shardable part decides for them exactly as one process would; a part that pools across KV heads (e.g. one
    selection shared by every head) sets it False, or overrides it with a property when a hyperparameter decides,
    and ``kvpolicy.distributed.check_shardable`` refuses to run it tensor-parallel.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    max_batch_size: ClassVar[int | None] = None
    shardable: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()  # optional modules the part imports (conformance skips without them)

    @classmethod
    def tiny(cls) -> Part:
        """A small instance for conformance tests and sweeps (defaults unless a class needs otherwise)."""
        return cls()

    def _unsupported(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} ({self.kind} {self.name!r}) does not support {what}")


class Index(Part):
    """Groups one layer's keys into pages (one page set per (batch row, KV head)) and answers top-k page
    queries.

    Contract:

    * ``build(keys, page_size=S)`` takes keys ``[B, Hkv, T, D]`` (float) and returns a ``PageLayout`` that
      puts every token in exactly one page of at most ``S`` tokens. Token ids are index-local (0..T-1).
      It replaces any previous content.
    * ``add(keys)`` (only if ``supports_add``) appends keys ``[B, Hkv, n, D]``; they get the next ids. It
      returns a layout of the pages that are new or whose contents changed; every other page keeps its
      contents and id.
    * ``search(queries, k)`` takes queries ``[B, Hq, D]`` (Hq a multiple of Hkv; the query heads of a GQA
      group share their KV head's pages) and returns a ``Selection`` of at most ``k`` distinct pages per
      (b, KV head), best first, PAD-padded. ``k`` larger than the number of pages returns them all.
      ``gqa_merges`` lists the GQA merge rules it accepts in ``params.gqa_merge`` (``kvpolicy.ops.GQA_MERGES``;
      None means ``"interleave"``, which every index supports); under ``"max"``/``"mean"`` the selection's
      ``scores`` hold the merged page scores, ``-inf`` on padding. An index that lists more than interleave
      rejects a rule it does not list (ValueError); one that lists only interleave ignores the field, so a caller
      that asks for another rule checks ``gqa_merges`` first (``IceCacheSelector`` does).
    * ``num_pages`` ``[B, Hkv]``, ``num_tokens`` and ``nbytes`` (index metadata bytes, keys it keeps for
      scoring included; ``device_nbytes``: how many of them sit on the accelerator) describe the current state;
      ``reset()`` empties it.
    """

    kind: ClassVar[str] = "index"
    supports_add: ClassVar[bool] = False
    # True: the structure chosen at build (e.g. the DCI tree's centres, fixed after build) should cover the
    # tokens; a prompt that streams in chunks then builds the index again over the CPU pool's tokens whenever it
    # has doubled since the last build (``PolicyLayer._rebuild_if_outgrown``), instead of adding them all
    prefers_full_build: ClassVar[bool] = False
    gqa_merges: ClassVar[tuple[str, ...]] = ("interleave",)
    device: str = "cpu"  # where search runs

    @abstractmethod
    def build(self, keys: torch.Tensor, *, page_size: int) -> PageLayout: ...

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int, *, params: SearchParams | None = None) -> Selection: ...

    def add(self, keys: torch.Tensor) -> PageLayout:
        raise self._unsupported("add()")

    def merge_rule(self, params: SearchParams | None) -> str:
        """The GQA merge rule asked for in ``params`` (``"interleave"`` if none), checked against ``gqa_merges``."""
        from kvpolicy.ops import check_gqa_merge

        rule = "interleave" if params is None or params.gqa_merge is None else params.gqa_merge
        return check_gqa_merge(rule, self.gqa_merges, f"gqa_merge of index {self.name!r}")

    @abstractmethod
    def reset(self) -> None: ...

    @property
    @abstractmethod
    def num_pages(self) -> torch.Tensor: ...

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    def device_nbytes(self) -> int:
        """The part of ``nbytes`` held in the memory of ``device`` when that is an accelerator (0 on the CPU).
        Default: all of it; an index that keeps some tables in host memory says so."""
        import torch

        return self.nbytes if torch.device(self.device).type != "cpu" else 0

    def capture_key(self, k: int, params: SearchParams | None = None) -> tuple | None:
        """A hashable key if ``search(queries, k, params=params)`` may be captured in a CUDA graph now, else None
        (the default). Capturable means: no host synchronisation, no data-dependent shape, and every tensor it
        reads lives in storage named by the key (a new key makes the caller re-capture). Optional."""
        return None

    def attach_pool(self, pool) -> bool:
        """Offered, after ``build``, the layer's CPU page pool (``kvpolicy.pool.PagePool``) once it holds the
        build's pages. From then on the layer writes every layout that ``build``/``add`` return into that pool
        before the next ``search``, so page ``p`` of row ``b * Hkv + h`` holds this index's page ``p``, slot for
        slot (``read_keys`` finds any stored token). An index that keeps keys only to score pages may read them
        there and drop its own copy; it returns True if it does. Default: False (nothing changes). Optional."""
        return False


class Selector(Part):
    """Decides, at each decode step, which pages each KV head attends to besides its sink and window.

    Contract:

    * ``prepare(keys, layout, ctx)`` runs once after prefill with the index-local keys ``[B, Hkv, n, D]`` and
      the index's layout (e.g. to compute page bounds). ``update(keys, layout, ctx)`` runs after each
      ``Index.add`` with the added keys and the layout of the changed pages.
    * ``select(query, ctx)`` takes the current query ``[B, Hq, D]`` and returns a valid ``Selection`` with at
      most ``ctx.k`` pages per (b, KV head) (``ctx.k`` is every page for an unlimited budget). A selector that
      moves pages between the KV heads of a batch row (per-head budgets) may give one head up to
      ``max_pages_per_head(ctx.k)`` pages, as long as the row holds at most ``Hkv * ctx.k`` in all; the layer
      sizes the GPU working set of each head by ``max_pages_per_head``.
    * ``requires_index``: the selector calls ``ctx.index.search``; ``query_aware``: the selection depends on
      the query; ``uses_budget = False`` marks selectors that always read every page (``full``).
    * ``needs_prompt_queries``: ``prepare`` reads ``ctx.prompt_queries`` (the prompt's queries ``[B, Hq, T, D]``,
      e.g. SnapKV's observation window) and ``ctx.prompt_keys`` (every prompt key ``[B, Hkv, T, D]``, for
      softmax normalisation); such a selector needs its prefill to run through the cache (a prefill
      reused from a dense cache has no queries).
    * ``reads_every_page(layer)``: in that layer the budget is unlimited (``ctx.k`` is every page) and the
      selector ranks all of them, best first (e.g. OmniKV's full-attention filter layers, whose ranking the
      following layers truncate to the budget through ``follows_layer``/``ctx.prev_selection``). ``prepare`` may run on a background thread while the next
      layer does its prefill; it must touch only its own state.
    """

    kind: ClassVar[str] = "selector"
    requires_index: ClassVar[bool] = False
    query_aware: ClassVar[bool] = True
    uses_budget: ClassVar[bool] = True
    needs_prompt_queries: ClassVar[bool] = False

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:  # noqa: B027
        """Default: nothing to prepare."""

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:  # noqa: B027
        """Default: nothing to update."""

    @abstractmethod
    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection: ...

    def reset(self) -> None:  # noqa: B027
        """Default: stateless."""

    @property
    def nbytes(self) -> int:
        """Bytes of the state the selector keeps (page digests, codebooks, hash planes, scores): by default every
        tensor among its attributes and their attributes' (one level down, e.g. a digest object), each storage
        counted once. Override if the state lives elsewhere."""
        return sum(t.untyped_storage().nbytes() for t in _state_tensors(self))

    @property
    def device_nbytes(self) -> int:
        """The part of ``nbytes`` held in accelerator memory (counted in the GPU totals of ``memory()``)."""
        return sum(t.untyped_storage().nbytes() for t in _state_tensors(self) if t.device.type != "cpu")

    def max_pages_per_head(self, k: int) -> int:
        """Most pages one (b, KV head) may select when the budget allows ``k`` retrieved pages per KV head (see
        ``select``). Default ``k``: every head gets the same share."""
        return k

    def reads_every_page(self, layer: int) -> bool:
        """Whether ``layer`` attends to every page (its budget is unlimited). Default: no layer."""
        return False

    def follows_layer(self, layer: int) -> int | None:
        """The earlier layer whose page layout (and so whose selection) this layer reuses, or None.

        A layer that follows another gets a ``MirrorIndex`` of that layer instead of its own index, and its
        ``ctx.prev_selection`` is the selection of the layer before it at the same step. Its ``select`` must not
        read the query and must give the same pages whether ``ctx.prev_selection`` is the selection of the layer
        just before it or that of the layer it follows: ``KVPolicyCache(prefetch="follow")`` selects and loads
        its pages as soon as the followed layer has selected, with ``query=None``."""
        return None

    def capture_key(self, ctx: SelectContext) -> tuple | None:
        """A hashable key if ``select(query, ctx)`` may be captured in a CUDA graph (see ``Index.capture_key``),
        else None (the default: never). Optional; ``PolicyLayer`` captures a whole decode step only when the
        selector, the allocator and the transfer all give a key."""
        return None


class PageAllocator(Part):
    """Maps logical pages to GPU slots of one layer and owns eviction of the GPU working set.

    Contract:

    * ``setup(batch_size, num_kv_heads, num_slots, device)`` sizes the slot table (``num_slots`` per
      (b, KV head)) and empties it.
    * ``reserve(selection)`` returns a ``Reservation``: every selected page gets a distinct slot in its
      row; pages already resident keep their slot (``missing`` False); the others get a free slot or evict
      a resident page that is not selected and not pinned (``missing`` True; ``evicted`` names the page
      dropped). Reserved slots stay pinned until ``release``. Selecting more pages than ``num_slots`` is an
      error.
    * ``lookup(page_ids)`` returns the slot of each page ``[B, Hkv, M]`` or PAD if not resident.
    * ``invalidate(page_ids)`` forgets residency of pages whose contents changed (they will be copied again).
    * ``num_free`` ``[B, Hkv]``: slots holding no page.
    * ``ensure_pages(num_pages)`` (optional): every page id passed later is below ``num_pages``; an allocator
      that keeps per-page tables sizes them here, so that ``reserve`` never reads page ids back from the device.
    """

    kind: ClassVar[str] = "allocator"

    def ensure_pages(self, num_pages: int) -> None:  # noqa: B027 (optional hook, no-op by default)
        return None

    def capture_key(self) -> tuple | None:
        """A hashable key if ``reserve`` and ``release`` may be captured in a CUDA graph (see
        ``Index.capture_key``), else None (the default). Optional."""
        return None

    @abstractmethod
    def setup(self, batch_size: int, num_kv_heads: int, num_slots: int, device: torch.device | str) -> None: ...

    @abstractmethod
    def reserve(self, selection: Selection) -> Reservation: ...

    @abstractmethod
    def release(self, reservation: Reservation) -> None: ...

    @abstractmethod
    def lookup(self, page_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def invalidate(self, page_ids: torch.Tensor) -> None: ...

    @abstractmethod
    def reset(self) -> None: ...

    @property
    @abstractmethod
    def num_free(self) -> torch.Tensor: ...


class Transfer(Part):
    """Moves pages between pools; never decides what to move.

    Contract:

    * ``submit(src_pool, src_ids, dst_pool, dst_slots)`` copies page ``src_ids[b, h, j]`` of ``src_pool``
      (K, V and valid length) into slot ``dst_slots[b, h, j]`` of ``dst_pool`` for every entry with
      ``src_ids >= 0`` (``[B, Hkv, K]`` int64 both). The copy is bit-exact: the slots hold what
      ``src_pool.read_pages`` reads (an fp8 pool's pages dequantised, ``q * scale`` in float32 rounded to the slots'
      dtype). It may be asynchronous. A source pool holds its K/V in chunks (``PagePool.gather_raw``, ``spans``,
      ``chunk_tables``); the destination is a slot pool (one chunk, ``dst_pool.k``/``v``).
    * ``wait(handle)`` orders the current stream after the copy (on CPU: returns when it is done). Reading
      ``dst_pool`` before ``wait`` is undefined.
    """

    kind: ClassVar[str] = "transfer"

    @abstractmethod
    def submit(
        self, src_pool: PagePool, src_ids: torch.Tensor, dst_pool: PagePool, dst_slots: torch.Tensor
    ) -> TransferHandle: ...

    @abstractmethod
    def wait(self, handle: TransferHandle) -> None: ...

    def capture_key(self, src_pool: PagePool, dst_pool: PagePool) -> tuple | None:
        """A hashable key if ``submit``/``wait`` between these pools may be captured in a CUDA graph (see
        ``Index.capture_key``), else None (the default). Optional."""
        return None
