"""Insertion: ``add(keys)`` of a DCI tree (the ``TreeInsert`` mixin of ``DCITreeIndex``).

New tokens go to level 0, under their nearest level-1 centre (exact brute force over the level-1 centres;
centres stay fixed after build, as in IceCache's decode). Each one is inserted at its projection rank into its
cell's leaves: the leaf with the largest first key not above it (B+-tree routing). A leaf that overflows is cut
into ``ceil(n/S)`` even pieces (one new token into a full leaf: halves, as ``btree_p_split_leaf``); the first
piece keeps the page id, the others get new ids. If a key raises ``M``, every cell that receives a token while
projected with an older ``M`` is re-projected and re-leafed in place (same page ids, new ones only if it needs
more pages; reference ``add_and_update_max_sq_norm``). All pages whose contents changed are returned.

Deviations from the C code: ``add`` finds the nearest level-1 centre exactly instead of with the insertion
query (fov 20, prop_to_retrieve 0.6). Several tokens landing in one leaf in a single call are placed together
(one even cut) instead of one by one; the resulting pages match the sequential B+-tree up to where the cut
falls. Freed page ids are never recycled (re-leafing keeps a cell's page count), so pages are never empty. No
deletion, no re-clustering of the centres during decode.
"""

from __future__ import annotations

import torch

from kvpolicy.ops import check_tensor
from kvpolicy.types import PAD, PageLayout
from kvpolicy_icecache.dci_tree.tensors import _NEG_INF, _segment_pos


class TreeInsert:
    """``add`` and the page-membership helper of ``DCITreeIndex``."""

    def add(self, keys: torch.Tensor) -> PageLayout:
        check_tensor("keys", keys, 4, dims="[B, Hkv, n, D]")
        if self._sq is None:
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
        kd = keys.detach().to(dev, self._kdtype).reshape(BH, n, D)
        if self._keys is not None:  # (keys_on_host: a copy to the host, in the insertion job; keys_in_pool: none)
            self._keys[:, t0:t1] = kd
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

        # parent: the nearest level-1 centre (exact; where the centres are, the search device), or the root
        # while the tree has a single level
        if self._L >= 2:
            sd = self._sdev
            near = self._nearest(kf.to(sd), sq.to(sd), self._c1_keys, self._c1_sq, M.to(sd))
            par = self._c1_cell[near].to(dev)
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
            km = self._gather_keys(m_row, m_tok)
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
        self._sync_mirror(r_, p_)
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
