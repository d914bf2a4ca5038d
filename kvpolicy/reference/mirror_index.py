"""``mirror``: a layer that lays out its own K/V in another layer's pages (layer reuse)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from kvpolicy.interfaces import Index
from kvpolicy.ops import check_tensor
from kvpolicy.types import PAD, PageLayout, SearchParams, Selection

if TYPE_CHECKING:  # pragma: no cover
    from kvpolicy.layer import PolicyLayer

__all__ = ["MirrorIndex"]


class MirrorIndex(Index):
    """Follows the page layout of an *anchor* layer: token i of this layer sits in the same page and slot
    as token i of the anchor, so a page id means the same tokens in both layers and the anchor's selection can
    be reused (IceCache layer reuse: the anchor's tree, the reusing layer's own K/V).

    Not registered as a plugin: ``KVPolicyCache`` installs it on the layers a selector says follow another
    (``Selector.follows_layer``). The anchor must run first in every prefill and decode step (it does: layers
    run in order). ``search`` is not supported: a following layer reuses the anchor's selection.
    """

    name: ClassVar[str] = "mirror"
    supports_add: ClassVar[bool] = True

    def __init__(self, anchor: PolicyLayer):
        self.anchor = anchor
        self.reset()

    def reset(self) -> None:
        self._n = 0

    def _full_layout(self) -> PageLayout:
        pool, P = self.anchor.kv.cpu_pool, int(self.anchor.index.num_pages.max()) if self.anchor.index.num_tokens else 0
        B, H = pool.batch_size, pool.num_kv_heads
        ids = torch.arange(P).expand(B, H, P)
        num = self.anchor.index.num_pages.cpu()  # [B, H]; the anchor's index may live on the GPU, its pool does not
        ids = torch.where(ids < num.unsqueeze(-1), ids, PAD)
        return PageLayout(page_ids=ids, token_ids=pool.token_ids[:, :, :P].clone(),
                          lengths=pool.lengths[:, :, :P].clone(), num_pages=num.clone(), num_tokens=self._n)

    def _check(self, keys: torch.Tensor, what: str) -> None:
        check_tensor("keys", keys, 4, dims="[B, Hkv, n, D]")
        if self.anchor.index.num_tokens != self._n + keys.shape[2]:
            raise RuntimeError(
                f"mirror of layer {self.anchor.layer_idx}: {what} of {keys.shape[2]} tokens leaves this layer at "
                f"{self._n + keys.shape[2]} tokens but the anchor holds {self.anchor.index.num_tokens}"
            )

    def build(self, keys: torch.Tensor, *, page_size: int) -> PageLayout:
        self._n = 0
        self._check(keys, "build")
        self._n = keys.shape[2]
        return self._full_layout()

    def add(self, keys: torch.Tensor) -> PageLayout:
        self._check(keys, "add")
        self._n += keys.shape[2]
        last = self.anchor.last_add_layout
        if last is None:
            raise RuntimeError(f"mirror of layer {self.anchor.layer_idx}: the anchor has not added pages yet")
        return last

    def search(self, queries: torch.Tensor, k: int, *, params: SearchParams | None = None) -> Selection:
        raise self._unsupported("search() (a following layer reuses its anchor's selection)")

    @property
    def num_pages(self) -> torch.Tensor:
        return self.anchor.index.num_pages

    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return 0  # the anchor's index holds the metadata
