"""Page pools: the K/V page storage of one layer.

A ``PagePool`` holds pages per (batch row, KV head). Its K and V are lists of **chunks** of ``chunk_pages``
pages each, ``[B, Hkv, Cc, S, D]``: page ``p`` of row (b, h) lives in chunk ``p // Cc`` at ``p % Cc``, and the
pool's ``capacity`` is ``len(k_chunks) * Cc``. Growing the pool appends chunks and copies nothing, so a pool can
grow to what the host holds without ever asking for one huge allocation (or, as doubling did, three times the
data at the peak). Per page it also keeps small metadata that grows by doubling (a copy, cheap next to K/V):
valid lengths ``[B, Hkv, C']``, and, for a CPU pool that backs an index, the index-local token id in every page
slot ``[B, Hkv, C', S]`` plus the inverse map (token -> page, offset), so pages whose contents change can be
rewritten from the pool itself. ``C' >= capacity``; pages at or past ``capacity`` are empty.

``pool_dtype`` (``kvpolicy.pool_dtype``) sets how K/V are stored: ``"auto"``, in ``dtype`` (the model's), or
``"fp8"``, as float8_e4m3fn with one float32 scale per (page, head) for K and for V (``k_scale``/``v_scale``
``[B, Hkv, C']``). ``dtype`` is always what readers get: ``read_pages``/``read_range`` dequantise; transfers and
the streamed prefill read the raw pages (``gather_raw``/``raw_range``) and dequantise on the GPU.

The CPU pool uses pinned (page-locked) memory whenever CUDA is available, so host-to-device copies can be
asynchronous and kernels can read it in place (``chunk_tables``). The GPU slot pool is the same class with
``track_tokens=False`` and ``capacity = N`` slots, held in one chunk in the model's dtype (``k``/``v``).
"""

from __future__ import annotations

import weakref

import torch

from kvpolicy.errors import HostMemoryError
from kvpolicy.host_memory import pinned_empty
from kvpolicy.pool_dtype import check_pool_dtype, dequantize, quantize, storage_dtype
from kvpolicy.types import PAD, PageLayout

__all__ = ["CHUNK_BYTES", "PagePool", "pin_by_default"]

CHUNK_BYTES = 64 << 20  # default bound of one chunk of K (V the same): at most this much allocated past the need
MIN_CHUNK_PAGES = 16  # smallest chunk the automatic choice makes

_POOLS: weakref.WeakSet = weakref.WeakSet()  # every live pool (the allocation error reports what they hold)


def pin_by_default(device: torch.device | str) -> bool:
    """Pin CPU pools when a CUDA device exists (pinned memory needs a CUDA driver)."""
    return torch.device(device).type == "cpu" and torch.cuda.is_available()


def _empty(shape, dtype, device, pin: bool, fill=None) -> torch.Tensor:
    if pin and fill is None:  # the big K/V stores: page-locked in place (kvpolicy.host_memory)
        return pinned_empty(shape, dtype)
    t = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    if fill is not None:
        t.fill_(fill)
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 elements as their bytes (torch's CPU index_copy_ has no fp8 kernel; a copy of bits is the same)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


class PagePool:
    """K/V pages of one layer for every (batch row, KV head), in chunks (see the module docstring).

    ``chunk_pages``: pages per chunk; ``None`` chooses at the first allocation: the power of two at or above the
    pages asked for (at least 16), but no more than fits ``chunk_bytes`` (one chunk of K, every row). A slot pool
    (``track_tokens=False``) is one chunk of ``capacity`` pages.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        page_size: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        pin: bool | None = None,
        track_tokens: bool = True,
        pool_dtype: str = "auto",
        chunk_pages: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.batch_size, self.num_kv_heads = batch_size, num_kv_heads
        self.page_size, self.head_dim = page_size, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.pool_dtype = check_pool_dtype(pool_dtype)
        self.storage_dtype = storage_dtype(pool_dtype, dtype)  # dtype of the K/V elements held
        self.fp8 = pool_dtype == "fp8"
        if self.fp8 and not track_tokens:
            raise ValueError("pool_dtype='fp8' is for the CPU page pool (track_tokens=True); slots hold the model dtype")
        for name, v in (("chunk_pages", chunk_pages), ("chunk_bytes", chunk_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.pinned = pin_by_default(self.device) if pin is None else bool(pin)
        self.track_tokens = track_tokens
        self.chunk_pages = chunk_pages if chunk_pages is not None else (None if track_tokens or not capacity else capacity)
        self.chunk_bytes = chunk_bytes
        B, H, S = batch_size, num_kv_heads, page_size
        # a tracked pool's pages are written whole (``write`` zero-fills the unused slots of every page it
        # writes) before any id can select them, so its K/V need no zero fill (a small saving: 8 ms per 537 MB
        # on the H100 host, benchmarks/results/decode/pinned_alloc_probe_h100.json). A slot pool is zeroed
        # (cheap, on the device).
        self._kv_fill = None if track_tokens else 0
        self.k_chunks: list[torch.Tensor] = []  # each [B, Hkv, Cc, S, D] storage_dtype (fp8: float8_e4m3fn)
        self.v_chunks: list[torch.Tensor] = []  # each [B, Hkv, Cc, S, D] storage_dtype
        # [B, Hkv, C'] (pinned: the GPU may read the pool directly, see kernels/page_load.py)
        self.lengths = _empty((B, H, 0), torch.int32, self.device, self.pinned, 0)
        self.k_scale = self.v_scale = None  # fp8: [B, Hkv, C'] float32, amax / 448 of each page's K, V (pinned)
        if self.fp8:
            self.k_scale = _empty((B, H, 0), torch.float32, self.device, self.pinned, 0)
            self.v_scale = _empty((B, H, 0), torch.float32, self.device, self.pinned, 0)
        if track_tokens:
            self.token_ids = torch.full((B, H, 0, S), PAD, dtype=torch.int64, device=self.device)  # [B, Hkv, C', S]
            self.token_page = torch.full((B, H, 0), PAD, dtype=torch.int64, device=self.device)  # [B, Hkv, T]
            self.token_offset = torch.full((B, H, 0), PAD, dtype=torch.int64, device=self.device)  # [B, Hkv, T]
        self._tables: dict[torch.device, tuple[int, torch.Tensor, torch.Tensor]] = {}  # see chunk_tables
        self._offsets: dict[torch.device, tuple[int, torch.Tensor]] = {}  # see chunk_offsets
        _POOLS.add(self)
        self.ensure_capacity(capacity)

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Pages per (b, head) that K/V storage exists for (whole chunks)."""
        return len(self.k_chunks) * (self.chunk_pages or 0)

    @property
    def num_chunks(self) -> int:
        return len(self.k_chunks)

    @property
    def nbytes(self) -> int:
        n = self.kv_nbytes + self.lengths.nbytes
        if self.track_tokens:
            n += self.token_ids.nbytes + self.token_page.nbytes + self.token_offset.nbytes
        return n

    @property
    def kv_nbytes(self) -> int:
        """Bytes of K and V as stored (fp8: the elements plus their per-page scales)."""
        n = sum(c.nbytes for c in self.k_chunks) + sum(c.nbytes for c in self.v_chunks)
        if self.fp8:
            n += self.k_scale.nbytes + self.v_scale.nbytes
        return n

    def page_nbytes(self) -> int:
        """Bytes of one page of one head as stored, K and V together (fp8: with the two scales)."""
        return 2 * self.page_size * self.head_dim * self.storage_dtype.itemsize + (8 if self.fp8 else 0)

    # ------------------------------------------------------------------ the K/V as one tensor (slot pools)
    @property
    def k(self) -> torch.Tensor:
        """K ``[B, Hkv, C, S, D]`` as one tensor (writable): only for a pool held in one chunk in the model's dtype
        (GPU slot pools, small CPU pools). Read any pool with ``read_pages``/``read_range``."""
        return self._whole("k")

    @property
    def v(self) -> torch.Tensor:
        """V ``[B, Hkv, C, S, D]`` as one tensor; see ``k``."""
        return self._whole("v")

    def _whole(self, name: str) -> torch.Tensor:
        chunks = self.k_chunks if name == "k" else self.v_chunks
        if self.fp8:
            raise RuntimeError(f"this pool stores {name.upper()} as fp8 with per-page scales; read it with "
                               "PagePool.read_pages or read_range (they dequantise)")
        if len(chunks) > 1:
            raise RuntimeError(f"this pool holds {name.upper()} in {len(chunks)} chunks of {self.chunk_pages} pages; "
                               "read it with PagePool.read_pages or read_range")
        if not chunks:
            B, H, S, D = self.batch_size, self.num_kv_heads, self.page_size, self.head_dim
            return torch.empty((B, H, 0, S, D), dtype=self.dtype, device=self.device)
        return chunks[0]

    # ------------------------------------------------------------------ growth
    def _auto_chunk_pages(self, pages: int) -> int:
        B, H, S, D = self.batch_size, self.num_kv_heads, self.page_size, self.head_dim
        fit = max(1, self.chunk_bytes // (B * H * S * D * self.storage_dtype.itemsize))
        fit = 1 << (fit.bit_length() - 1)  # a power of two within chunk_bytes
        want = 1 << max(pages - 1, 0).bit_length()  # the power of two at or above the pages asked for
        return min(fit, max(want, MIN_CHUNK_PAGES))

    def ensure_capacity(self, pages: int) -> None:
        """Grow to hold at least ``pages`` pages per (b, head) by appending chunks; nothing is copied but the small
        per-page metadata (grown by doubling). Every allocation is made before any state changes: one that fails
        raises ``HostMemoryError`` naming the bytes asked for and held, and leaves the pool as it was."""
        C = self.capacity
        if pages <= C:
            return
        Cc = self.chunk_pages or self._auto_chunk_pages(pages)
        n_new = -(-(pages - C) // Cc)
        new_c = C + n_new * Cc
        LC = self.lengths.shape[2]
        new_lc = LC if new_c <= LC else max(new_c, 2 * LC)
        B, H, S, D = self.batch_size, self.num_kv_heads, self.page_size, self.head_dim
        shape = (B, H, Cc, S, D)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        meta = None
        try:
            for _ in range(n_new):
                new_k.append(_empty(shape, self.storage_dtype, self.device, self.pinned, self._kv_fill))
                new_v.append(_empty(shape, self.storage_dtype, self.device, self.pinned, self._kv_fill))
            if new_lc > LC:
                meta = self._grown_meta(new_lc)
        except (MemoryError, RuntimeError) as e:
            new_k.clear()
            new_v.clear()
            meta = None
            asked = 2 * n_new * B * H * Cc * S * D * self.storage_dtype.itemsize
            held = sum(p.nbytes for p in list(_POOLS) if p.device.type == self.device.type)
            kind = f"{'pinned ' if self.pinned else ''}{self.device.type} memory"
            hint = "" if self.fp8 else ", or cpu_pool_dtype='fp8' (half the K/V bytes)"
            raise HostMemoryError(
                f"could not allocate {_size(asked)} of {kind} to grow a K/V page pool from {C} to {new_c} pages per "
                f"(batch row, KV head) ({n_new} chunk(s) of {Cc} pages for K and for V, plus page metadata); this pool "
                f"holds {_size(self.nbytes)}, all page pools of this process in {self.device.type} memory hold "
                f"{_size(held)}. Use a shorter context or a smaller batch{hint}. Cause: {' '.join(str(e).split())}"
            ) from e
        self.chunk_pages = Cc
        self.k_chunks += new_k
        self.v_chunks += new_v
        if meta is not None:
            for name, t in meta.items():
                setattr(self, name, t)

    def _grown_meta(self, new_lc: int) -> dict[str, torch.Tensor]:
        """The per-page metadata with room for ``new_lc`` pages per row, contents kept (not yet installed)."""
        B, H, S, LC = self.batch_size, self.num_kv_heads, self.page_size, self.lengths.shape[2]
        out = {"lengths": _empty((B, H, new_lc), torch.int32, self.device, self.pinned, 0)}
        if self.fp8:
            out["k_scale"] = _empty((B, H, new_lc), torch.float32, self.device, self.pinned, 0)
            out["v_scale"] = _empty((B, H, new_lc), torch.float32, self.device, self.pinned, 0)
        if self.track_tokens:
            out["token_ids"] = torch.full((B, H, new_lc, S), PAD, dtype=torch.int64, device=self.device)
        for name, t in out.items():
            t[:, :, :LC] = getattr(self, name)
        return out

    def _ensure_tokens(self, tokens: int) -> None:
        T = self.token_page.shape[-1]
        if tokens <= T:
            return
        new_t = max(tokens, 2 * T, 64)
        B, H = self.batch_size, self.num_kv_heads
        for name in ("token_page", "token_offset"):
            old = getattr(self, name)
            new = torch.full((B, H, new_t), PAD, dtype=torch.int64, device=self.device)
            new[:, :, :T] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ chunk addressing
    def spans(self, p0: int, p1: int) -> list[tuple[int, int, int]]:
        """Pages ``p0 .. p1-1`` cut at chunk boundaries: ``(chunk, first local page, end local page)`` in order."""
        if not 0 <= p0 <= p1 <= self.capacity:
            raise ValueError(f"page range [{p0}, {p1}) is outside the pool's {self.capacity} pages")
        Cc, out = self.chunk_pages, []
        while p0 < p1:
            c, a = divmod(p0, Cc)
            b = min(Cc, a + p1 - p0)
            out.append((c, a, b))
            p0 += b - a
        return out

    def _by_chunk(self, pages: torch.Tensor):
        """Group page ids ``[M]`` by chunk: ``(chunk, positions in pages or None for all, local ids)``."""
        Cc = self.chunk_pages
        if self.num_chunks == 1:
            return [(0, None, pages)]
        c = pages // Cc
        found = torch.unique(c).tolist()
        if len(found) == 1:
            return [(found[0], None, pages - found[0] * Cc)]
        out = []
        for ci in found:
            sel = (c == ci).nonzero().squeeze(1)
            out.append((ci, sel, pages[sel] - ci * Cc))
        return out

    def _chunks(self, name: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return (self.k_chunks, self.k_scale) if name == "k" else (self.v_chunks, self.v_scale)

    def chunk_tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_chunks]`` int64 addresses of the K and of the V chunks, on ``device``: what a kernel that reads the
        pool in place (``kvpolicy_kernels.page_load``) indexes. Made once per device and chunk count (a growth
        makes new ones), so a decode step reads them without a host-to-device copy."""
        dev = torch.device(device)
        hit = self._tables.get(dev)
        if hit is None or hit[0] != self.num_chunks:
            k = torch.tensor([c.data_ptr() for c in self.k_chunks], dtype=torch.int64).to(dev)
            v = torch.tensor([c.data_ptr() for c in self.v_chunks], dtype=torch.int64).to(dev)
            hit = self._tables[dev] = (self.num_chunks, k, v)
        return hit[1], hit[2]

    def chunk_offsets(self, device: torch.device | str) -> torch.Tensor:
        """``[num_chunks]`` int64 element offsets of the K chunks from K chunk 0, on ``device``: what a kernel that
        addresses every chunk through chunk 0's pointer indexes (``kvpolicy_kernels.page_scores.pool_page_scores``).
        Made once per device and chunk count, like ``chunk_tables``."""
        dev = torch.device(device)
        hit = self._offsets.get(dev)
        if hit is None or hit[0] != self.num_chunks:
            base, size = self.k_chunks[0].data_ptr(), self.k_chunks[0].element_size()
            off = torch.tensor([(c.data_ptr() - base) // size for c in self.k_chunks], dtype=torch.int64).to(dev)
            hit = self._offsets[dev] = (self.num_chunks, off)
        return hit[1]

    # ------------------------------------------------------------------ reads
    def _gather(self, name: str, rows: torch.Tensor, pages: torch.Tensor, out: torch.Tensor | None):
        """One of K/V: (pages ``[M, S, D]`` as stored, scales ``[M]`` or None); rows, pages ``[M]`` on the device."""
        M, S, D = rows.numel(), self.page_size, self.head_dim
        chunks, scale = self._chunks(name)
        dst = out if out is not None else torch.empty((M, S * D), dtype=self.storage_dtype, device=self.device)
        if M:
            for c, sel, local in self._by_chunk(pages):
                src = chunks[c].view(-1, S * D)
                if sel is None:
                    torch.index_select(src, 0, rows * self.chunk_pages + local, out=dst)
                else:
                    dst[sel] = src.index_select(0, rows[sel] * self.chunk_pages + local)
        s = scale.view(-1)[rows * self.lengths.shape[2] + pages] if self.fp8 else None
        return dst.view(M, S, D), s

    def gather_raw(self, rows: torch.Tensor, pages: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None
                   = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Pages as stored: rows (``b * Hkv + h``) and pages ``[M]`` int64 (each below ``capacity``) -> K, V
        ``[M, S, D]`` storage dtype and their scales ``[M]`` float32 (``None`` unless fp8). ``out``: two
        ``[M, S*D]`` buffers to fill (e.g. pinned staging) instead of new tensors."""
        rows, pages = rows.to(self.device), pages.to(self.device)
        k, ks = self._gather("k", rows, pages, out[0] if out is not None else None)
        v, vs = self._gather("v", rows, pages, out[1] if out is not None else None)
        return k, v, ks, vs

    def read_pages(self, rows: torch.Tensor, pages: torch.Tensor, *, dtype: torch.dtype | None = None,
                   values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K, V ``[M, S, D]`` of pages (rows ``b * Hkv + h`` and page ids ``[M]``, each below ``capacity``) in
        ``dtype`` (default: the pool's ``dtype``), dequantised, on the pool's device; ``values=False``: K only
        (V is None)."""
        rows, pages = rows.to(self.device), pages.to(self.device)
        dtype = dtype or self.dtype
        k = dequantize(*self._gather("k", rows, pages, None), dtype)
        return k, dequantize(*self._gather("v", rows, pages, None), dtype) if values else None

    def raw_range(self, p0: int, p1: int):
        """Pages ``p0 .. p1-1`` of every row as stored, within one chunk: views K, V ``[B, Hkv, n, S, D]`` and
        scales ``[B, Hkv, n]`` (``None`` unless fp8)."""
        spans = self.spans(p0, p1)
        if len(spans) > 1:
            raise ValueError(f"pages [{p0}, {p1}) span {len(spans)} chunks of {self.chunk_pages} pages; cut the range "
                             "with PagePool.spans")
        if spans:
            c, a, b = spans[0]
            k, v = self.k_chunks[c][:, :, a:b], self.v_chunks[c][:, :, a:b]
        else:
            B, H, S, D = self.batch_size, self.num_kv_heads, self.page_size, self.head_dim
            k = v = torch.empty((B, H, 0, S, D), dtype=self.storage_dtype, device=self.device)
        if not self.fp8:
            return k, v, None, None
        return k, v, self.k_scale[:, :, p0:p1], self.v_scale[:, :, p0:p1]

    def read_range(self, p0: int, p1: int, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[B, Hkv, p1 - p0, S, D]`` of pages ``p0 .. p1-1`` of every row in ``dtype`` (default: the pool's),
        dequantised: views of the storage when the range lies in one chunk and needs no conversion, else copies."""
        dtype = dtype or self.dtype
        parts: tuple[list, list] = ([], [])
        for c, a, b in self.spans(p0, p1) or [(0, 0, 0)]:
            q0 = c * (self.chunk_pages or 0) + a
            k, v, sk, sv = self.raw_range(q0, q0 + b - a)
            for out, t, s in ((parts[0], k, sk), (parts[1], v, sv)):
                out.append(t if s is None and t.dtype == dtype else dequantize(t, s, dtype))
        k, v = (p[0] if len(p) == 1 else torch.cat(p, dim=2) for p in parts)
        return k, v

    # ------------------------------------------------------------------ writes
    def _put_pages(self, name: str, rows: torch.Tensor, pages: torch.Tensor, x: torch.Tensor) -> None:
        """Store whole pages ``x`` ``[R, S, D]`` at rows/pages ``[R]`` (quantised for fp8)."""
        chunks, scale = self._chunks(name)
        S, D = self.page_size, self.head_dim
        if self.fp8:
            x, s = quantize(x)
            scale.view(-1).index_copy_(0, rows * self.lengths.shape[2] + pages, s)
        x = _bits(x.to(self.storage_dtype).reshape(-1, S * D))
        for c, sel, local in self._by_chunk(pages):
            r = rows if sel is None else rows[sel]
            _bits(chunks[c]).view(-1, S * D).index_copy_(0, r * self.chunk_pages + local, x if sel is None else x[sel])

    def _put_rows(self, name: str, x: torch.Tensor) -> None:
        """Store pages ``0 .. M-1`` of every row from ``x`` ``[B*Hkv, M, S, D]`` (a build), wherever ``x`` lives (e.g.
        the GPU: fp8 is quantised there, so half the bytes cross): contiguous copies per row and chunk (a strided
        destination would be staged)."""
        chunks, scale = self._chunks(name)
        BH, M, S, D = x.shape
        for r in range(BH):  # one row at a time: fp8 quantises one row's float32 copy, not the layer's
            xr = x[r]
            if self.fp8:
                xr, s = quantize(xr)  # [M, S, D] fp8, [M]
                scale.view(BH, -1)[r, :M].copy_(s)
            xr = xr.to(self.storage_dtype).view(M, S * D)
            q0 = 0
            for c, a, b in self.spans(0, M):
                chunks[c].view(BH, self.chunk_pages, S * D)[r, a:b].copy_(xr[q0:q0 + b - a])
                q0 += b - a

    def _get_tokens(self, name: str, rows: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Tokens this pool holds: rows, pages, offsets ``[n]`` -> ``[n, D]`` float32 for fp8, else the pool dtype."""
        chunks, scale = self._chunks(name)
        S, D = self.page_size, self.head_dim
        out = torch.empty((rows.numel(), D), dtype=self.storage_dtype, device=self.device)
        for c, sel, local in self._by_chunk(pages):
            r, o = (rows, offs) if sel is None else (rows[sel], offs[sel])
            got = chunks[c].view(-1, D).index_select(0, (r * self.chunk_pages + local) * S + o)
            if sel is None:
                out = got
            else:
                out[sel] = got
        if not self.fp8:
            return out
        return out.float() * scale.view(-1)[rows * self.lengths.shape[2] + pages].unsqueeze(-1)

    def read_keys(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """K of tokens by index-local id (``read_tokens``). An index that reads its keys from this pool
        (``Index.attach_pool``) gathers the keys of tokens it moves with it."""
        return self.read_tokens(rows, tokens, "k")

    def read_tokens(self, rows: torch.Tensor, tokens: torch.Tensor, name: str = "k") -> torch.Tensor:
        """K (``name="k"``) or V (``"v"``) of tokens by index-local id, wherever they are stored now: rows
        (``b * Hkv + h``) and tokens ``[n]`` int64 (each stored here) -> ``[n, D]`` float32 (fp8 dequantised)."""
        if name not in ("k", "v"):
            raise ValueError(f"name must be 'k' or 'v', got {name!r}")
        if not self.track_tokens:
            raise RuntimeError("PagePool.read_tokens needs track_tokens=True (a slot pool keeps no token map)")
        rows, tokens = rows.to(self.device), tokens.to(self.device)
        T = self.token_page.shape[-1]
        flat = rows * T + tokens
        pages, offs = self.token_page.view(-1)[flat], self.token_offset.view(-1)[flat]
        if bool((pages < 0).any()):
            raise ValueError("read_tokens asked for a token that this pool does not hold")
        return self._get_tokens(name, rows, pages, offs).float()

    def write(self, layout: PageLayout, keys: torch.Tensor, values: torch.Tensor, base: int) -> None:
        """Write the pages of ``layout``.

        ``keys``/``values`` ``[B, Hkv, n, D]`` hold the tokens with index-local ids ``base .. base+n-1``;
        tokens of the layout with smaller ids are already in this pool and are moved from where they are.
        Pages are written whole (unused slots zeroed); an fp8 pool quantises each page with its own scale.
        """
        if not self.track_tokens:
            raise RuntimeError("PagePool.write needs track_tokens=True (a slot pool is written by a Transfer)")
        src_dev = keys.device  # new tokens are gathered where they are (e.g. on the GPU), then moved once
        n = keys.shape[2]
        pids, tids = layout.page_ids.to(self.device), layout.token_ids.to(self.device)  # [B,H,M], [B,H,M,S]
        if pids.numel() == 0:
            return
        self.ensure_capacity(int(pids.max()) + 1)
        self._ensure_tokens(base + n)
        B, H, M, S = tids.shape
        C, LC, D, dev = self.capacity, self.lengths.shape[2], self.head_dim, self.device
        row = (torch.arange(B, device=dev).view(B, 1, 1, 1) * H + torch.arange(H, device=dev).view(1, H, 1, 1))
        row = row.expand(B, H, M, S)  # (b, h) row of every page slot
        valid = (tids >= 0) & (pids >= 0).unsqueeze(-1)  # [B, H, M, S]
        is_new = valid & (tids >= base)
        old = valid & ~is_new  # tokens this pool already holds, moved to another page
        rows = pids >= 0  # [B, H, M]
        r_idx, p_idx = row[..., 0][rows], pids[rows]  # [R] row and page of every page written
        # flat source row of every slot: new tokens from `keys`, older ones from where this pool holds them
        new_src = (row * n + (tids - base)).clamp(0, max(B * H * n - 1, 0))[rows].reshape(-1)
        any_old = bool(old.any())
        # fp8: pages that mix in tokens already held (dequantised, float32) are assembled in float32, then
        # quantised; pages of new tokens only (a build) stay in the model's dtype until each row is quantised
        # (_put_rows): a float32 copy of a long layer was the fill's largest GPU transient (4.3 GiB per tensor at
        # 1M tokens)
        work = torch.float32 if self.fp8 and any_old else self.dtype
        keys, values = keys.to(dtype=work), values.to(device=src_dev, dtype=work)
        if any_old:
            t_old = tids.clamp(min=0, max=max(self.token_page.shape[-1] - 1, 0)).reshape(B * H, -1)
            old_page = self.token_page.reshape(B * H, -1).gather(1, t_old).reshape(B, H, M, S)
            old_off = self.token_offset.reshape(B * H, -1).gather(1, t_old).reshape(B, H, M, S)
            if bool((old & (old_page < 0)).any()):
                raise ValueError("layout moves a token that this pool never stored")
            o_rows, o_pages, o_offs = (t[rows].reshape(-1) for t in (row, old_page.clamp(min=0), old_off.clamp(min=0)))
        newm, keep = is_new[rows].reshape(-1, 1), valid[rows].reshape(-1, 1)
        in_order = not any_old and M <= C and bool(((pids == torch.arange(M, device=dev)) | (pids < 0)).all())
        for name, fresh in (("k", keys), ("v", values)):
            if in_order and n:  # pages 0..M-1 of every row, all new (a build): gather there, one copy per row
                idx = (row * n + (tids - base)).clamp(0, B * H * n - 1).reshape(-1).to(src_dev)
                g = fresh.reshape(B * H * n, D).index_select(0, idx)
                g = g.masked_fill_(~valid.reshape(-1, 1).to(src_dev), 0)
                self._put_rows(name, g.view(B * H, M, S, D))
                continue
            if n:
                a = fresh.reshape(B * H * n, D).index_select(0, new_src.to(src_dev)).to(dev)  # one move
            else:
                a = torch.zeros((newm.shape[0], D), dtype=work, device=dev)
            if any_old:
                a = torch.where(newm, a, self._get_tokens(name, o_rows, o_pages, o_offs).to(work))
            src = a.masked_fill_(~keep, 0)  # [R*S, D]
            self._put_pages(name, r_idx, p_idx, src.view(-1, S, D))
        meta = r_idx * LC + p_idx  # flat page index in the metadata
        self.lengths.view(-1).index_copy_(0, meta, layout.lengths.to(dev)[rows].to(torch.int32))
        self.token_ids.view(B * H * LC, S).index_copy_(0, meta, torch.where(valid, tids, PAD)[rows])
        T = self.token_page.shape[-1]
        tflat = (row * T + tids.clamp(min=0))[valid]
        self.token_page.view(-1).index_copy_(0, tflat, pids.unsqueeze(-1).expand(B, H, M, S)[valid])
        self.token_offset.view(-1).index_copy_(0, tflat, torch.arange(S, device=dev).expand(B, H, M, S)[valid])

    def reset(self) -> None:
        self.lengths.zero_()
        if self.fp8:
            self.k_scale.zero_()
            self.v_scale.zero_()
        if self.track_tokens:
            self.token_ids.fill_(PAD)
            self.token_page.fill_(PAD)
            self.token_offset.fill_(PAD)
