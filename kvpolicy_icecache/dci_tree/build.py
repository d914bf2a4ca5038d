"""Tree build: levels, parents and pages of a DCI tree (the ``TreeBuild`` mixin of ``DCITreeIndex``).

Geometry (MIPS -> nearest neighbour, dci.c ``data_projection``/``transform_compute_dist*``): with ``M`` the running
maximum squared key norm of one (b, head), a key ``k`` stands for ``[k, sqrt(M - |k|^2)]`` and a query for
``[q/|q|, 0]``, so the nearest key in that space is the key of largest ``q . k``. Two keys are compared by
``M - k1.k2 - sqrt((M - |k1|^2)(M - |k2|^2))`` (half their squared distance in the lifted space).

``build(keys, page_size=S)``:

1. Levels: deterministic position-ordered promotion (:func:`promotion_levels`; ``ratio_1`` to level 1,
   ``ratio_2`` above, reference defaults 0.01 / 0.2) or, with ``random_promotion=True``, seeded random
   promotion. Levels depend on positions only, so every head has the same centres.
2. Parents, top-down: every point's parent is its nearest point one level up under the lifted key-key
   distance, by exact brute force (one batched matmul per level, chunked). The reference does the same
   while the upper level has at most 3000 points (always for level 1 below ~300k tokens at ratio 0.01).
3. Pages: in every cell, members sorted by projection on direction 0 of ``num_simple * num_composite``
   normalised Gaussian directions in R^{D+1} drawn from ``seed`` (shared by all heads, and by all layers
   built with the same seed, as IceCache shares one ``proj_vec``), cut into ``ceil(n/S)`` leaves whose sizes
   differ by at most one (reference B+-tree bulk load). Centres are tokens too and sit in pages of their
   parent's cell (the root cell for the top level), so every token is in exactly one page.

Not implemented: the anchor shortcut of the parent assignment (the brute force is exact and batched) and
brute-force limits (no approximate parent search above 3000 centres). ``validate()`` checks the structure that
build and ``add`` maintain.
"""

from __future__ import annotations

import torch

from kvpolicy.host_memory import pinned_empty
from kvpolicy.ops import check_tensor, triton_available
from kvpolicy.types import PAD, PageLayout
from kvpolicy_icecache.dci_tree.promotion import _random_levels, promotion_levels
from kvpolicy_icecache.dci_tree.tensors import _CHUNK_ELEMS, _segment_pos, _triton_interpreting


class TreeBuild:
    """Capacity, geometry, build, leaf filling and the page layout of ``DCITreeIndex``; structure checks."""

    @property
    def level_sizes(self) -> list[int]:
        """Tokens on each level, bottom (level 0) first."""
        if self._sq is None or self._n == 0:
            return []
        return torch.bincount(self._tok_level[: self._n], minlength=self._L).tolist()

    def token_pages(self) -> torch.Tensor:
        """Page of every token: ``[B, Hkv, T]`` int64."""
        if self._sq is None:
            return torch.zeros((0, 0, 0), dtype=torch.int64)
        return self._tok_page[:, : self._n].reshape(self._B, self._H, self._n).clone()


    def parents(self) -> torch.Tensor:
        """Parent of every token (the centre whose cell holds it; PAD for top-level tokens): [B, Hkv, T]."""
        if self._sq is None:
            return torch.zeros((0, 0, 0), dtype=torch.int64)
        par = self._cell_tok[self._parent[:, : self._n]]
        return par.reshape(self._B, self._H, self._n).clone()


    # ---------------------------------------------------------------- capacity
    def _grow_tokens(self, n: int) -> None:
        """Make room for ``n`` tokens in every per-token table (capacity at least doubles when it grows)."""
        cap = self._sq.shape[1]
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

        if self._keys is not None:  # (None: the keys are read from the layer's pool, see attach_pool)
            keys = self._key_store(self._keys.shape[0], new, self._keys.shape[2], self._keys.dtype, self._keys.device)
            keys[:, : self._keys.shape[1]] = self._keys
            self._keys = keys
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
        self._page_cell = torch.cat(
            [self._page_cell, torch.full((BH, new - cap), PAD, dtype=torch.int64, device=dev)], 1)

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
        return torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).square()  # (no float32 copy of k)

    @staticmethod
    def _lift_coord(sq: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """The appended coordinate sqrt(M - |k|^2): sq [BH, n], M [BH] or [BH, n] -> [BH, n]."""
        if M.dim() == 1:
            M = M[:, None]
        return (M - sq).clamp(min=0).sqrt()

    def _project(self, k: torch.Tensor, sq: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Projections of lifted keys ``[k, sqrt(M - |k|^2)]`` on the directions (reference ``data_projection``).

        k [BH, n, D] float (bf16/fp16: converted a chunk at a time), sq [BH, n], M [BH] or [BH, n] -> [BH, n,
        num_simple * num_composite] float32."""
        D, n = self._D, k.shape[1]
        if k.dtype != torch.float32 and n:
            step = max(1, _CHUNK_ELEMS // max(1, k.shape[0] * D))
            return torch.cat([self._project(k[:, s : s + step].float(), sq[:, s : s + step],
                                            M if M.dim() == 1 else M[:, s : s + step]) for s in range(0, n, step)], 1)
        return k @ self._u[:, :D].T + self._lift_coord(sq, M)[..., None] * self._u[:, D]

    def _nearest(self, x: torch.Tensor, sqx: torch.Tensor, c: torch.Tensor, sqc: torch.Tensor,
                 M: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre under the lifted key-key distance
        ``M - x.c - sqrt((M - |x|^2)(M - |c|^2))``, i.e. the argmax of ``x.c + sqrt(..)sqrt(..)``.

        x [BH, n, D] (any float dtype: converted a chunk at a time), c [BH, m, D] float32; M [BH] -> [BH, n]
        int64 in [0, m). Exact, chunked over n."""
        BH, n, _ = x.shape
        m = c.shape[1]
        ct = c.transpose(1, 2)  # [BH, D, m]
        ac = self._lift_coord(sqc, M)[:, None, :]  # [BH, 1, m]
        step = max(1, _CHUNK_ELEMS // max(1, BH * m))
        out = []
        for s in range(0, n, step):
            sc = torch.bmm(x[:, s : s + step].float(), ct)
            sc.baddbmm_(self._lift_coord(sqx[:, s : s + step], M)[:, :, None], ac)  # + a_x a_c (rank-1)
            out.append(sc.argmax(-1))
        return torch.cat(out, 1) if out else torch.zeros((BH, 0), dtype=torch.int64, device=x.device)

    def _key_store(self, BH: int, cap: int, D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed key store [BH, cap, D]: page-locked in place on the host for a CUDA search (``pinned_empty``:
        exactly the bytes asked for, returned to the system when freed), else on ``device``."""
        if self._host_keys and self._sdev.type == "cuda":
            return pinned_empty((BH, cap, D), dtype).zero_()
        return torch.zeros((BH, cap, D), dtype=dtype, device=device)

    def _gather_keys(self, rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        """Keys of tokens ``toks`` of rows ``rows`` ([N] int64) as float32 [N, D], from the attached pool or the
        key store, through a reused buffer (no fresh allocation: on CPU a new multi-MB tensor costs more in page
        faults than the copy itself)."""
        if self._pool is not None:  # the pool holds them (fp8 pages: dequantised)
            return self._pool.read_keys(rows, toks).to(self._dev)
        flat = rows * self._keys.shape[1] + toks
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
        self._host_tables = self.tables_on_host and self._host_keys  # (the build itself runs on the device)
        BH, S = B * H, page_size
        self._B, self._H, self._D, self._S, self._n = B, H, D, S, T
        cap = T + max(256, T // 8)  # headroom for add() before the first (copying) growth
        kd = keys.detach().to(dev).reshape(BH, T, D)
        self._kdtype = keys.dtype
        self._keys = self._key_store(BH, cap, D, keys.dtype, torch.device("cpu") if self._host_keys else dev)
        self._keys[:, :T] = kd  # (keys_in_pool: until the layer's pool takes over, see attach_pool)
        kf = kd  # the model's dtype: the steps below convert what they read to float32 (a float32 copy of the
        #          keys was the largest transient of a long build: 4 GiB per layer at 1M tokens, 8 heads of 128)
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
            kc, sqc = kf[:, up].float(), self._sq[:, up]
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
        self._c1_keys = kf.index_select(1, c1).float()  # [BH, N1, D] float32 (a copy)
        self._c1_sq = self._sq.index_select(1, c1)  # [BH, N1]
        # tokens of each upper level (fixed after build: add() puts new tokens on level 0), for masked search
        self._level_tok = [c1[:0]] + [torch.nonzero(self._tok_level == lvl).flatten() for lvl in range(1, self._L)]
        # their keys on the search device (the centre scores of the masked search read no key store)
        self._level_keys = [self._c1_keys[:, :0]] + [
            self._c1_keys if lvl == 1 else kf.index_select(1, self._level_tok[lvl]).float() for lvl in range(1, self._L)]
        self._level_par = [self._parent[:, :0]] + [self._parent[:, t] for t in self._level_tok[1:]]  # [BH, N_l]
        self._level_cell = [self._tok_cell[:0]] + [self._tok_cell[t] for t in self._level_tok[1:]]  # [N_l]
        self._tok_page = torch.full((BH, T), PAD, dtype=torch.int64, device=dev)
        self._tok_slot = torch.full((BH, T), PAD, dtype=torch.int64, device=dev)
        self._page_tok = torch.full((BH, 0, S), PAD, dtype=torch.int64, device=dev)
        self._page_len = torch.zeros((BH, 0), dtype=torch.int64, device=dev)
        self._page_cell = torch.full((BH, 0), PAD, dtype=torch.int64, device=dev)
        self._num_pages = torch.zeros(BH, dtype=torch.int64, device=dev)
        self._cell_pages = torch.full((BH, C, 0), PAD, dtype=torch.int64, device=dev)
        self._cell_npages = torch.zeros((BH, C), dtype=torch.int64, device=dev)
        self._cell_size = torch.zeros((BH, C), dtype=torch.int64, device=dev)
        self._cell_M = self._M[:, None].expand(BH, C).clone()
        self._scratch = torch.empty((0, D), dtype=keys.dtype, device=dev)
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
        if self._host_tables:
            self._offload_tables()
        pids = torch.arange(P, device=self._dev).expand(BH, P)
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
        self._page_cell[row, pid] = g_cell[grp]
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


    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError unless the internal structure is consistent (used by tests)."""
        if self._sq is None:
            return
        BH, n, S = self._sq.shape[0], self._n, self._S
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
        if not torch.equal(torch.where(live, cell_of_page, PAD), self._page_cell):
            raise ValueError("the page -> cell table disagrees with the pages' tokens")
        if self._mirror is not None:
            m = self._mirror
            tok = () if self._pool is not None else (("page_tok", self._page_tok),)  # (keys_in_pool: not mirrored)
            for name, host in (*tok, ("page_len", self._page_len),
                               ("page_cell", self._page_cell), ("num_pages", self._num_pages),
                               ("subtree", self._subtree)):
                if not torch.equal(getattr(m, name).cpu().long(), host.cpu()):
                    raise ValueError(f"the search mirror's {name} disagrees with the host table")
