"""``omnikv``: OmniKV (Hao et al., ICLR 2025): a few filter layers choose the tokens the following layers reuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.types import PAD, PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import TokenPages, page_valid, rank_pages

__all__ = ["OmniKVSelector"]


@dataclass(kw_only=True)
class OmniKVSelector(Selector):
    """Token-drop-free dynamic selection with inter-layer reuse.

    * Layers before the first filter layer and the filter layers themselves attend to every page
      (``reads_every_page``). A filter layer ranks all its pages by the attention mass of the current query
      (exact softmax over its keys, summed over heads) and returns the whole ranking.
    * Every other layer follows the nearest filter layer below it (``follows_layer``): it lays out its K/V in
      the same pages and attends to the first ``budget`` pages of that ranking (``ctx.prev_selection``).

    Defaults follow OmniKV's released example config for Llama-3-8B (``do_select_layers = 2,8,18``,
    ``selector_cls = last``: the last token's query; ``dense_more``: the filter layers keep full attention);
    preset ``omnikv`` uses single-token pages, as OmniKV selects tokens. ``shared_heads=True`` selects one token
    set for all heads (mass summed over every head, as OmniKV does); False ranks per KV head. The filter layers
    keep a copy of their keys on the compute device for the scoring (they are dense layers: their K/V pages sit in
    GPU slots anyway). Deviation: OmniKV sizes the selection as a fraction of the context
    (``num_of_selected_tokens``); here it is the policy's token budget, like every other selector.
    """

    name: ClassVar[str] = "omnikv"
    conformance: ClassVar[dict] = {"selector_kwargs": {"filter_layers": (0,)}}
    filter_layers: tuple[int, ...] = (2, 8, 18)
    shared_heads: bool = True

    def __post_init__(self) -> None:
        layers = tuple(sorted({int(x) for x in self.filter_layers}))
        if not layers or layers[0] < 0:
            raise ValueError(f"filter_layers must be a non-empty list of layer indices >= 0, got {self.filter_layers}")
        self.filter_layers = layers
        self.reset()

    @property
    def shardable(self) -> bool:  # one token set for every head pools the heads, which TP spreads over ranks
        return not self.shared_heads

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, Hkv, Tcap, D] filter layer: every key, on the compute device
        self.pages = TokenPages()
        self.n = 0

    @property
    def nbytes(self) -> int:
        """The filter layer's copy of its keys (0 in other layers)."""
        return 0 if self.keys is None else self.keys[:, :, : self.n].nbytes

    def reads_every_page(self, layer: int) -> bool:
        return layer < self.filter_layers[0] or layer in self.filter_layers

    def follows_layer(self, layer: int) -> int | None:
        if self.reads_every_page(layer):
            return None
        return max(f for f in self.filter_layers if f < layer)

    def _append(self, keys: torch.Tensor) -> None:
        B, H, n, D = keys.shape
        if self.keys is None or self.n + n > self.keys.shape[2]:
            grown = keys.new_zeros(B, H, 2 * (self.n + n), D)
            if self.keys is not None:
                grown[:, :, : self.n] = self.keys[:, :, : self.n]
            self.keys = grown
        self.keys[:, :, self.n : self.n + n] = keys
        self.n += n

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self.reset()
        if ctx.layer in self.filter_layers:
            self._append(keys)
            self.pages.write(layout, keys.device)

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        if ctx.layer in self.filter_layers:
            self._append(keys)
            self.pages.write(layout, keys.device)

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        P = int(ctx.num_pages.max()) if ctx.num_pages.numel() else 0
        if ctx.layer in self.filter_layers:
            B, Hq, D = query.shape
            H = ctx.num_kv_heads
            k = self.keys[:, :, : self.n].float()  # [B, H, n, D]
            q = query.to(k.device).float().view(B, H, Hq // H, D)
            mass = (torch.einsum("bhgd,bhnd->bhgn", q, k) * ctx.scaling).softmax(-1).sum(2)  # [B, H, n]
            if self.shared_heads:
                mass = mass.sum(1, keepdim=True).expand(B, H, self.n)
            scores = self.pages.reduce(mass, P, "sum")  # [B, H, P]
            return rank_pages(scores.masked_fill(~page_valid(ctx, P, scores.device), float("-inf")), ctx.k)
        if self.reads_every_page(ctx.layer):  # dense layers before the first filter layer: every page, any order
            ids = torch.arange(P, device=ctx.num_pages.device).expand(*ctx.num_pages.shape, P)
            return Selection(page_ids=torch.where(page_valid(ctx, P, ids.device), ids, PAD))
        prev = ctx.prev_selection
        if prev is None:
            raise RuntimeError(
                f"omnikv: layer {ctx.layer} reuses the selection of filter layer {self.follows_layer(ctx.layer)}, "
                "but no selection of this step reached it (run it through KVPolicyCache)"
            )
        ids = prev.page_ids[..., : ctx.k]
        return Selection(page_ids=torch.where(ids < ctx.num_pages.to(ids.device).unsqueeze(-1), ids, PAD))
