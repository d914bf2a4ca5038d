"""``DigestSelector``: the mechanics of page-digest selectors (Quest, ArkVale).

A digest summarises the keys of one page when the page is written (build or add): the per-channel minimum
and maximum (a bounding box), the mean key (centroid) and the radius of the ball around the centroid that
holds every key. Each step scores every page's digest against the query; a leaf class says how (``score``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.interfaces import Selector
from kvpolicy.ops import storage_key
from kvpolicy.types import PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import page_keys, rank_pages_per_head

__all__ = ["DigestSelector", "PageDigests"]


class PageDigests:
    """Per-page digests of one layer, on the compute device: ``lo``/``hi``/``centre`` [B, Hkv, Pcap + 1, D] and
    ``radius`` [B, Hkv, Pcap + 1] (float32; the last row takes the writes of PAD pages), and ``num_pages``
    [B, Hkv] int64, the pages written so far (updated in place: its storage stays fixed)."""

    def __init__(self) -> None:
        self.lo = self.hi = self.centre = self.radius = self.num_pages = None

    @property
    def capacity(self) -> int:
        return 0 if self.lo is None else self.lo.shape[2] - 1

    def write(self, layout: PageLayout, ctx: SelectContext, device: torch.device) -> None:
        """(Re)compute the digests of the pages in ``layout`` from their keys in the pool."""
        keys, valid = page_keys(ctx.pool, layout.page_ids, device)  # [B, H, M, S, D], [B, H, M, S]
        B, H, M, S, D = keys.shape
        need = int(layout.num_pages.max()) if layout.num_pages.numel() else 0
        self._grow(B, H, need, D, device)
        v = valid.unsqueeze(-1)
        cnt = valid.sum(-1, keepdim=True).clamp(min=1)  # [B, H, M, 1]
        lo = keys.masked_fill(~v, float("inf")).amin(3)  # [B, H, M, D]
        hi = keys.masked_fill(~v, float("-inf")).amax(3)
        centre = keys.masked_fill(~v, 0).sum(3) / cnt
        radius = ((keys - centre.unsqueeze(3)).norm(dim=-1).masked_fill(~valid, 0)).amax(-1)  # [B, H, M]
        empty = ~valid.any(-1, keepdim=True)
        lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)
        ids = layout.page_ids.to(device)
        dst = torch.where(ids >= 0, ids, self.lo.shape[2] - 1)  # PAD rows land in the spare last page
        idx = dst.unsqueeze(-1).expand(B, H, M, D)
        self.lo.scatter_(2, idx, lo)
        self.hi.scatter_(2, idx, hi)
        self.centre.scatter_(2, idx, centre)
        self.radius.scatter_(2, dst, radius)
        num = layout.num_pages.to(device)  # pages in the index after this write
        if self.num_pages is None or self.num_pages.shape != num.shape:
            self.num_pages = num.clone()
        else:
            self.num_pages.copy_(num)

    def _grow(self, B: int, H: int, pages: int, D: int, device: torch.device) -> None:
        cap = 0 if self.lo is None else self.lo.shape[2] - 1
        if self.lo is not None and pages <= cap:
            return
        # the first allocation keeps 1/8 headroom (decode-time pages are then written in place); later ones double
        new_cap = max(pages + max(16, pages // 8), 16) if self.lo is None else max(pages, 2 * cap, 16)
        fresh = [torch.zeros(B, H, new_cap + 1, D, device=device) for _ in range(3)]
        radius = torch.zeros(B, H, new_cap + 1, device=device)
        if self.lo is not None:
            for dst, src in zip(fresh, (self.lo, self.hi, self.centre)):
                dst[:, :, :cap] = src[:, :, :cap]
            radius[:, :, :cap] = self.radius[:, :, :cap]
        self.lo, self.hi, self.centre = fresh
        self.radius = radius


@dataclass(kw_only=True)
class DigestSelector(Selector):
    """Scores page digests against the query; each query head ranks the pages and the GQA group's rankings
    are interleaved. Works over any index's pages (digests follow the index layout)."""

    requires_index: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.digests = PageDigests()

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self.digests = PageDigests()
        self.digests.write(layout, ctx, keys.device)

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self.digests.write(layout, ctx, keys.device)

    def score(self, q: torch.Tensor, d: PageDigests, P: int) -> torch.Tensor:
        """q: [B, Hkv, G, D] float32 -> [B, Hkv, G, P] page scores (higher = more important)."""
        raise NotImplementedError

    def capture_key(self, ctx: SelectContext) -> tuple | None:
        """Capturable on CUDA: ``select`` scores every page of the digest capacity and masks the pages not
        written yet with the digests' own page counts, so it reads fixed storage in fixed shapes (until the
        digests grow)."""
        d = self.digests
        if d.lo is None or not d.lo.is_cuda:
            return None
        return ("digests", *storage_key(d.lo, d.hi, d.centre, d.radius, d.num_pages), ctx.k, ctx.num_kv_heads)

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        d = self.digests
        P = d.capacity  # fixed between growths; pages not written yet score -inf
        B, Hq, D = query.shape
        H = ctx.num_kv_heads
        q = query.to(d.lo.device).float().view(B, H, Hq // H, D)
        scores = self.score(q, d, P)  # [B, H, G, P]
        valid = torch.arange(P, device=scores.device) < d.num_pages.unsqueeze(-1)  # [B, H, P]
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        return rank_pages_per_head(scores.reshape(B, Hq, P), H, ctx.k)


def box_upper_bound(q: torch.Tensor, d: PageDigests, P: int) -> torch.Tensor:
    """Largest q.k over the page's bounding box: sum_d max(q_d lo_d, q_d hi_d). q: [B, H, G, D] -> [B, H, G, P]."""
    pos, neg = q.clamp(min=0), q.clamp(max=0)
    return torch.einsum("bhgd,bhpd->bhgp", pos, d.hi[:, :, :P]) + torch.einsum("bhgd,bhpd->bhgp", neg, d.lo[:, :, :P])
