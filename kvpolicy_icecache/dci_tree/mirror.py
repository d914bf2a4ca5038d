"""The search mirror of a DCI tree whose tables live on the host (``tables_on_host``; the ``TreeMirror`` mixin).

With ``keys_on_host`` alone the key store sits in pinned host memory, but the per-token tables (parents, token ->
page maps, projections, squared norms: about 60 bytes per token and head in int64/float32) stay on the GPU, some
16-18% of a layer's bf16 KV bytes at D = 128 (``benchmarks/results/capacity/llama8b_1m_h100_icecache_hostkeys.json``).
The masked search reads none of them per token. What it reads is kept here, on the search device:

===================  ===================  ===========================================================
table                shape, dtype         use
===================  ===================  ===========================================================
``page_tok``         [BH, P*, S] int32    token ids of each page: the page-score kernel reads the host
                                          key store through it (4 bytes per token); empty ``[BH, 0, S]``
                                          once the keys are read from the layer's pool (``keys_in_pool``)
``page_len``         [BH, P*] int32       tokens of each page (the scanned fraction)
``page_cell``        [BH, P*] int32       cell holding each page (is the page in the frontier?)
``num_pages``        [BH] int64           pages of each (b, head)
``subtree``          [BH, C] int64        pages under each cell (the beam's ``k'`` rule)
===================  ===================  ===========================================================

plus, fixed after build, each upper level's centre keys (float32), parents and owned cells (about 1% of the
tokens are centres). At D = 128 in bf16 that is some 10 bytes per token and head against 512 of K and V: about
2%. Build runs on the search device (the parent assignment is a large matmul), then moves every table to the
host; ``add`` runs on the host (its nearest-centre step on the search device) and copies the rows of the pages it
changed into the mirror, in place, so a captured search stays valid until a table has to grow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SearchTables(NamedTuple):
    """The tables the masked search reads (see the module docstring), on the search device."""

    page_tok: torch.Tensor  # [BH, P*, S] token ids, -1 = empty place
    page_len: torch.Tensor  # [BH, P*]
    page_cell: torch.Tensor  # [BH, P*] cell holding the page (-1: no page)
    num_pages: torch.Tensor  # [BH]
    subtree: torch.Tensor  # [BH, C] pages under each cell


# tables of the host side that build creates on the search device and hands to the host at its end (the centre
# tables ``_c1_*``, ``_level_*`` stay on the search device: add's nearest-centre step and the search read them)
_HOST_TABLES = ("_sq", "_proj", "_parent", "_tok_page", "_tok_slot", "_tok_level", "_tok_cell", "_page_tok",
                "_page_len", "_page_cell", "_num_pages", "_cell_pages", "_cell_npages", "_cell_size", "_cell_M",
                "_subtree", "_cell_tok", "_cell_anc", "_M", "_u", "_scratch")


class TreeMirror:
    """Which tables the search reads, and their device copy when the index's tables live on the host."""

    def _search_tables(self) -> SearchTables:
        if self._mirror is not None:
            return self._mirror
        return SearchTables(self._page_tok, self._page_len, self._page_cell, self._num_pages, self._subtree)

    def _offload_tables(self) -> None:
        """End of a ``tables_on_host`` build: every growing table to the host, then the search mirror."""
        host = torch.device("cpu")
        for name in _HOST_TABLES:
            setattr(self, name, getattr(self, name).to(host))
        self._dev = host
        self._make_mirror()

    def _make_mirror(self) -> None:
        """A fresh device copy of the searched tables (new storage: a captured search is captured again)."""
        dev = self._sdev
        self._mirror = SearchTables(
            page_tok=self._page_tok[:, :0].to(dev, torch.int32) if self._pool is not None
            else self._page_tok.to(dev, torch.int32),
            page_len=self._page_len.to(dev, torch.int32),
            page_cell=self._page_cell.to(dev, torch.int32),
            num_pages=self._num_pages.to(dev),
            subtree=self._subtree.to(dev),
        )

    def _sync_mirror(self, rows: torch.Tensor, pages: torch.Tensor) -> None:
        """Copy the host rows of the given pages (rows, pages: [n] int64, host) into the mirror, in place; a host
        table that has grown past the mirror's capacity gets a new mirror instead."""
        m = self._mirror
        if m is None:
            return
        if m.page_len.shape[1] < self._page_len.shape[1]:
            self._make_mirror()
            return
        dev = self._sdev
        idx = (rows.to(dev), pages.to(dev))
        if self._pool is None:
            m.page_tok.index_put_(idx, self._page_tok[rows, pages].to(dev, torch.int32))
        m.page_len.index_put_(idx, self._page_len[rows, pages].to(dev, torch.int32))
        m.page_cell.index_put_(idx, self._page_cell[rows, pages].to(dev, torch.int32))
        m.num_pages.copy_(self._num_pages)
        m.subtree.copy_(self._subtree)
