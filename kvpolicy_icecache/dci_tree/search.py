"""Search of a DCI tree (the ``TreeSearch`` mixin of ``DCITreeIndex``), the CUDA-graph replay included.

``search(queries, k)``: cumulative descent from the root with field of view
``F = field_of_view or max(int(fov_ratio * T), min_field_of_view)`` (reference: 0.0015, 30). At each level every
token of the frontier cells is scored exactly by ``q . k``; each query head keeps its top ``max(min(F, found),
k')`` centres (``k'``: the shortest prefix whose subtrees hold ``k`` pages, the reference rule), and their cells
form the next frontier. Pages are ranked by their best scored token over all levels (upper-level pages included:
"cumulative"), top ``k`` per query head, then the GQA group is merged by interleaving ranks
(``kvpolicy.ops.gqa_merge``); with ``SearchParams.gqa_merge`` ``"max"`` or ``"mean"`` the group's page scores are
merged first and ranked once (``kvpolicy.ops.group_page_scores``; the selection then carries the merged scores).
The rule does not change the descent, only the final ranking. A (row, head) that finds fewer than ``min(k, pages)`` pages (tiny trees, huge
``k``) is ranked by an exact scan.

Two implementations give identical selections (``search_mode``; tested): ``"beam"`` gathers and scores only the
frontier cells' pages (data-dependent shapes, one host sync per level; needed for the ``prop_to_*`` pruning);
``"masked"`` scores every key with one ``K q^T`` and runs the descent on fixed-shape masks over each level's
centres (no key gathers, no host sync; on CUDA it is captured once into a CUDA graph and replayed,
``cuda_graphs=True``, re-captured only when a table is reallocated). On CUDA (``fused_scores=None``: when triton
is installed; ``True`` forces it, e.g. under the Triton interpreter, ``False`` never) the page maxima come from
one Triton kernel that reads the keys through the page table, ``kvpolicy_kernels.page_scores.token_page_scores``,
instead of an fp32 copy of every key and a scatter; only the centres are scored by ``bmm`` (from a float32 copy
of each level's centre keys), and only the pages of the scanned cells are read. ``"auto"`` (default) takes
``"masked"`` on CUDA unless pruning is asked for, ``"beam"`` on the CPU (the faster one there; timings in
``docs/icecache.md``). ``last_scanned_fraction`` tells how much of the index the last search scored.

Keys on the host (``keys_on_host=True`` with a CUDA ``device``): the key store, the one table that grows with the
context as T x D, lives in pinned CPU memory; centres' keys, projections, page and cell tables stay on the GPU.
The masked search reads the keys of the scanned pages only, through unified addressing (the GPU loads them over
PCIe inside the page-score kernel), so the index holds no device copy of the keys; the exhaustive path and
``add``'s re-projections read them the same way or on the host. Selections are the same as with the device store
(tested); each search moves the scanned fraction of the keys over PCIe.

Deviations from the C code:

* Search is a batched beam search, not a per-point priority walk. Within a kept cell every token is scored
  exactly by default (``prop_to_retrieve = prop_to_visit = 1.0``). The C code scans a cell along its 1-D
  projection in batches of 128 (``CLOSEST``) and stops after ``max(nn, min(ceil(prop_to_visit*n),
  ceil(prop_to_retrieve*n)))`` points (IceCache: 0.8); cells of at most 128 points (most level-1 cells at ratio
  0.01) are therefore scanned exactly there too. Setting ``prop_to_retrieve``/``prop_to_visit`` below 1 (fields
  or ``SearchParams``) reproduces that pruning per query head, except that we visit the ``v`` tokens closest in
  projection rather than whole 128-blocks from the nearer side. Pruning does not save time here (the batched
  scan scores the gathered pages anyway; the rank computation costs extra) and costs recall
  (``docs/icecache.md``), hence the default.
* The query heads of a GQA group share one gather: each head scores the union of the group's frontier cells and
  picks its beam from that union (the C code descends per query head). The gather costs no more than per-head
  gathers, and each head ranks a superset of its own candidates.
* When one level's candidate tokens exceed ``dense_scan_fraction`` of the index (GQA unions at the default
  field of view cover most of it), their scores are taken from one dense ``K q^T`` instead of a gather: the same
  scores, less memory traffic. ``dense_scan_fraction=1.0`` always gathers.
* Every scored token counts for its page's score, also centres that were scored but not kept.
"""

from __future__ import annotations

import torch

from kvpolicy.concurrency import GraphCache
from kvpolicy.ops import (
    check_tensor,
    gqa_merge,
    group_page_scores,
    page_max_scores,
    storage_key,
    topk_ids,
    triton_available,
)
from kvpolicy.types import PAD, SearchParams, Selection
from kvpolicy_icecache.dci_tree.tensors import _NEG_INF, _compact, _segment_pos, _unique_rows


class TreeSearch:
    """``search``, ``capture_key`` and the beam, masked and CUDA-graph descents of ``DCITreeIndex``."""

    @property
    def last_scanned_fraction(self) -> float:
        """Mean fraction of the tokens of a (b, head) whose score the last ``search`` computed (NaN before)."""
        if self._last_scanned is None or self._n == 0:
            return float("nan")
        return float(self._last_scanned.float().mean()) / self._n


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
        if self._sq is None:
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
            kk = self._gather_keys(rows.expand(BH, R * S).reshape(-1), toks.clamp(min=0).reshape(-1))
            kk = kk.view(BH, R * S, D)
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
        BH, dev = B * H, self._sdev
        fov, pr, pv = self._params(params)
        merge = self.merge_rule(params)
        q = queries.detach().to(dev).float().reshape(BH, G, D)
        if self._n == 0 or k == 0:
            empty = torch.full((B, H, 0), PAD, dtype=torch.int64, device=dev)
            return Selection(page_ids=empty, scores=None if merge == "interleave" else empty.float())
        if self._L <= 1 or k >= self._min_pages:  # exhaustive: exact ranking of every page
            self._last_scanned = torch.full((BH,), self._n, dtype=torch.int64, device=dev)
            return Selection(*self._merge(*self._exact_ranking(q, k, merge), k))
        masked = self._masked(pr, pv)
        if self._host_keys and not masked:
            raise ValueError("keys_on_host runs the masked search only; prop_to_retrieve/prop_to_visit < 1 need "
                             "the 'beam' search, which reads the keys on the index's device")
        if masked and min(pr, pv) < 1.0:
            raise ValueError("search_mode='masked' scans whole cells; prop_to_retrieve/prop_to_visit < 1 need 'beam'")
        if masked:
            if self.cuda_graphs and dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                ids, scores = self._graph_search(q, k, fov, merge)
                return Selection(ids.clone(), None if scores is None else scores.clone())
            # (inside a caller's capture, see capture_key: the same work, recorded into the caller's graph)
            return Selection(*self._masked_merged(q, k, torch.full((), fov, device=dev), merge))
        ids, vals = self._search_beam(q, k, fov, pr, pv, merge)
        short = self._short(ids, k)
        if bool(short.any()):
            full_ids, full_vals = self._exact_ranking(q, k, merge)
            ids, vals = self._fallback(ids, full_ids, short), self._fallback(vals, full_vals, short, _NEG_INF)
        return Selection(*self._merge(ids, vals, k))

    def _merge(self, ids: torch.Tensor, vals: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rankings of the query heads -> one per KV head. ids/vals [BH, G', k'] (G' = G: per query head, merged by
        interleaving; G' = 1: one ranking of the group's merged scores) -> (ids [B, Hkv, <= k], scores or None)."""
        B, H = self._B, self._H
        if ids.shape[1] == 1:  # a score-based rule already ranked the group as one
            return ids.view(B, H, -1), vals.view(B, H, -1)
        return gqa_merge(ids.view(B, H, ids.shape[1], -1), k), None

    def _masked(self, pr: float, pv: float) -> bool:
        return self.search_mode == "masked" or (
            self.search_mode == "auto" and min(pr, pv) >= 1.0 and (self._sdev.type == "cuda" or self.keys_on_host)
        )

    def _tables(self) -> tuple[torch.Tensor, ...]:
        """The tables the masked search reads (``add`` updates them in place until it reallocates one)."""
        per_token = (self._tok_page,) if self._mirror is None else ()  # (the dense, unfused page maxima)
        if self._pool is None:
            return (self._keys, *per_token, *self._search_tables())
        keys = (self._pool.chunk_offsets(self._sdev),) + ((self._pool.k_scale,) if self._pool.fp8 else ())
        return (*keys, *per_token, *self._search_tables())  # (a new chunk table when the pool grows)

    def capture_key(self, k: int, params: SearchParams | None = None) -> tuple | None:
        """The masked search on CUDA is capturable (no host sync, fixed shapes); the exhaustive path is not
        offered. The key pins the tables' storage, ``k`` and the field of view (which grows with the context)."""
        if self._sq is None or self._sdev.type != "cuda" or self._n == 0 or k == 0:
            return None
        fov, pr, pv = self._params(params)
        if self._L <= 1 or k >= self._min_pages or not self._masked(pr, pv) or min(pr, pv) < 1.0:
            return None
        return storage_key(*self._tables()) + (k, fov, self._B, self._H, self.merge_rule(params))

    def _short(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """(row, head) pairs whose descent found fewer than min(k, pages) pages (tiny trees): [BH, G] bool."""
        return (ids >= 0).sum(-1) < torch.clamp(self._search_tables().num_pages, max=k)[:, None]

    @staticmethod
    def _fallback(ids: torch.Tensor, full: torch.Tensor, short: torch.Tensor, pad: float = PAD) -> torch.Tensor:
        """Take the exhaustive ranking ``full`` (ids, or their scores with ``pad=-inf``) for the ``short`` (row,
        head) pairs. -> [BH, G, full width]"""
        width = full.shape[-1]
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=pad)[..., :width]
        return torch.where(short[..., None], full, ids)

    def _masked_merged(self, q: torch.Tensor, k: int, fov: torch.Tensor, merge: str = "interleave"
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked descent, fallback and GQA merge without a host sync: q [BH, G, D], fov 0-dim -> (ids
        [B, Hkv, k'], merged scores or None, see ``_merge``)."""
        (ids, vals), (full_ids, full_vals) = self._search_masked(q, k, fov, merge)
        short = self._short(ids, k)
        ids, vals = self._fallback(ids, full_ids, short), self._fallback(vals, full_vals, short, _NEG_INF)
        return self._merge(ids, vals, k)

    def _graph_search(self, q: torch.Tensor, k: int, fov: int, merge: str = "interleave"
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_masked_merged`` replayed from a CUDA graph: capture once per (tables, G, k), then one launch per
        search. The tables are updated in place by ``add``; a reallocation (capacity growth, build) changes the key
        and triggers a new capture."""
        if self._graph is None:
            self._graph = GraphCache()
        key = storage_key(*self._tables()) + (q.shape, k, merge)
        return self._graph.replay(key, lambda sq, sf: self._masked_merged(sq, k, sf, merge), q, fov)

    def _search_beam(self, q: torch.Tensor, k: int, fov: int, pr: float, pv: float, merge: str = "interleave"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam descent that gathers and scores only the pages of the frontier cells. q [BH, G, D] ->
        (ranked page ids [BH, G', k'] PAD-padded, their scores; G' = G per query head, 1 for a score-based
        ``merge``)."""
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
        scores = group_page_scores(torch.cat(seen_scores, -1), merge)  # [BH, G', R]
        pos, vals = topk_ids(scores, k)  # [BH, G', k']
        ids = pages[:, None].expand(BH, pos.shape[1], pages.shape[1]).gather(-1, pos.clamp(min=0))
        return torch.where(pos >= 0, ids, torch.full_like(ids, PAD)), vals

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

    def _search_masked(self, q: torch.Tensor, k: int, fov: torch.Tensor, merge: str = "interleave"
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The same descent (same frontier rule, GQA union, cumulative page scores) in fixed shapes: one dense
        ``K q^T``, then per upper level a small sort over that level's centres, and one masked page max.
        No gathers of keys, no data-dependent shapes (no host synchronisation). q [BH, G, D] -> ((ranked ids
        [BH, G', k'], their scores), the exhaustive ranking from the same scores for rows whose descent finds too
        few pages); G' = G per query head, 1 for a score-based ``merge``."""
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
        st = self._search_tables()
        front = torch.zeros_like(st.subtree, dtype=torch.bool)  # [BH, C] cells whose pages are scanned
        front[:, 0] = True  # the root
        for child in range(self._L - 1, 0, -1):
            ok = front.gather(1, self._level_par[child])  # [BH, Nc] centres of this level in a scanned cell
            s = centre_scores(child).masked_fill(~ok[:, None], _NEG_INF)  # [BH, G, Nc]
            cells = self._level_cell[child].expand(BH, -1)  # [BH, Nc] the cell each centre owns
            keep, order = self._beam_keep(s, st.subtree.gather(1, cells), k, fov)
            picked = torch.where(keep, cells[:, None].expand_as(order).gather(-1, order), 0)  # 0: root, already set
            front.scatter_(1, picked.reshape(BH, -1), True)
        # every page lies in one cell, so a page is scanned iff its cell is: one page max serves both rankings
        P = st.page_len.shape[1]
        seen = front.gather(1, st.page_cell.clamp(min=0).long()) & (st.page_cell >= 0)  # [BH, P*]
        if fused:
            # only the scanned pages are read, unless the descent finds too few of them (see _short: the
            # exhaustive ranking below then needs every page of that row)
            live = torch.arange(P, device=seen.device) < st.num_pages[:, None]
            short = (seen & live).sum(-1) < torch.clamp(st.num_pages, max=k)  # [BH]
            ps = self._page_maxima(q, seen | short[:, None])
        else:
            tp = self._tok_page[:, None].expand(BH, G, -1)
            ps = page_max_scores(dense.reshape(1, BH * G, -1), tp.reshape(1, BH * G, -1), P).view(BH, G, P)
        self._last_scanned = (st.page_len * seen).sum(-1)
        ps = group_page_scores(ps, merge)  # [BH, G', P*]
        return topk_ids(ps.masked_fill(~seen[:, None], _NEG_INF), k), topk_ids(ps, k)

    def _exact_ranking(self, q: torch.Tensor, k: int, merge: str = "interleave"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every page ranked by its best token: q [BH, G, D] -> (ids [BH, G', min(k, P*)], their scores; G' = G
        per query head, 1 for a score-based ``merge``). With the keys on the host, the fused kernel reads them
        through the page table (no device copy of the key store)."""
        if self._host_keys:
            return topk_ids(group_page_scores(self._page_maxima(q), merge), k)
        return self._rank_pages(self._dense_scores(q), k, merge)

    def _page_maxima(self, q: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        """Best token score of each page by the fused kernel, keys read in place through the page table, or from
        the attached pool's pages (``keys_in_pool``): q [BH, G, D] float32, load [BH, P*] bool (pages to read;
        None: all) -> [BH, G, P*]."""
        from kvpolicy_kernels.page_scores import pool_page_scores, token_page_scores

        st, mask = self._search_tables(), None if load is None else load[:, None]
        if self._pool is None:
            return token_page_scores(q.contiguous(), self._keys[:, None], st.page_tok[:, None], mask)
        pool, BH = self._pool, q.shape[0]
        chunks = [c.view(BH, 1, *c.shape[2:]) for c in pool.k_chunks]  # [B, Hkv, Cc, S, D] -> one row per (b, h)
        scale = pool.k_scale.view(BH, 1, -1) if pool.fp8 else None
        return pool_page_scores(q.contiguous(), chunks, st.page_len[:, None], k_scale=scale, mask=mask,
                                offsets=pool.chunk_offsets(self._sdev))

    def _rank_pages(self, s: torch.Tensor, k: int, merge: str = "interleave") -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ranked by their best token score. s [BH, G, n] (-inf: not scanned) -> (ids [BH, G', min(k, P*)],
        scores) (P* the page capacity; pages never scanned come back PAD; G' as in ``_exact_ranking``)."""
        BH, G, n = s.shape  # n: tokens, or the token capacity (masked search)
        P = self._page_len.shape[1]
        tp = self._tok_page[:, None, :n].expand(BH, G, n)
        ps = page_max_scores(s.reshape(1, BH * G, n), tp.reshape(1, BH * G, n), P).view(BH, G, P)
        return topk_ids(group_page_scores(ps, merge), k)
