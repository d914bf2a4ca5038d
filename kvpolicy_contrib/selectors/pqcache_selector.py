"""``pqcache``: PQCache (Zhang et al., SIGMOD 2025): product quantization of keys, approximate scores pick tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.errors import MissingDependencyError
from kvpolicy.interfaces import Selector
from kvpolicy.types import PageLayout, SelectContext, Selection
from kvpolicy_contrib.selectors._pages import TokenPages, page_valid, rank_pages_per_head

__all__ = ["PQCacheSelector"]


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency of kvpolicy
        raise MissingDependencyError("selector 'pqcache' needs faiss: pip install faiss-cpu") from e
    return faiss


@dataclass(kw_only=True)
class PQCacheSelector(Selector):
    """At prefill, the keys of each (layer, KV head) are product-quantized: split into ``subvectors`` parts,
    each part clustered by k-means (faiss ``ProductQuantizer``, L2) into ``2**bits`` centroids. Each step,
    the query's inner products with every centroid form a lookup table; a token's approximate score is the sum
    of its codes' entries (asymmetric distance computation), and the pages holding the best tokens are loaded.
    Tokens written during decoding are encoded with the prefill codebooks (no retraining).

    Defaults follow PQCache's ``run_llama.sh``: 2 sub-vectors per head, 6 bits, L2 clustering, 32 sink and 32
    recent tokens (our default split at >= 128 tokens); preset ``pqcache`` uses single-token pages, as PQCache
    fetches tokens. Deviations: k-means runs ``kmeans_iters`` faiss iterations on at most ``max_train`` keys per
    head (PQCache sizes iterations dynamically); query heads of a GQA group rank separately and are interleaved;
    PQCache's GPU LFU token cache is the policy's allocator here.
    """

    name: ClassVar[str] = "pqcache"
    requires: ClassVar[tuple[str, ...]] = ("faiss",)
    subvectors: int = 2
    bits: int = 6
    kmeans_iters: int = 20
    max_train: int = 65536
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.subvectors < 1:
            raise ValueError(f"subvectors must be >= 1, got {self.subvectors}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in [1, 8], got {self.bits}")
        if self.kmeans_iters < 1 or self.max_train < 1:
            raise ValueError("kmeans_iters and max_train must be >= 1")
        self.reset()

    def reset(self) -> None:
        self.centroids: torch.Tensor | None = None  # [B, Hkv, M, ksub, dsub]
        self.used: torch.Tensor | None = None  # [B, Hkv, ksub] bool: centroids trained (short prompts use fewer)
        self.codes: torch.Tensor | None = None  # [B, Hkv, Tcap, M] int64 codeword of each token and part
        self.pages = TokenPages()
        self.n = 0

    # ------------------------------------------------------------------ codebooks
    def _train(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """k-means codebooks of one head's keys. x: [n, D] -> ([M, 2**bits, dsub] float32, centroids used)."""
        faiss = _faiss()
        n, D = x.shape
        M = self.subvectors
        nbits = max(1, min(self.bits, int(math.log2(max(n, 2)))))  # a short prompt cannot fill 2**bits centroids
        pq = faiss.ProductQuantizer(D, M, nbits)
        pq.cp.niter = self.kmeans_iters
        pq.cp.seed = self.seed
        pq.cp.max_points_per_centroid = max(1, self.max_train >> nbits)
        pq.cp.min_points_per_centroid = 1  # short prompts are fine (no faiss warning)
        pq.train(x.contiguous().numpy())
        ksub, dsub = 1 << nbits, D // M
        cent = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(M, ksub, dsub).copy())
        out = torch.zeros(M, 1 << self.bits, dsub)
        out[:, :ksub] = cent
        return out, ksub

    def _encode(self, keys: torch.Tensor) -> torch.Tensor:
        """Nearest codeword per part. keys: [B, Hkv, n, D] -> [B, Hkv, n, M] int64."""
        B, H, n, D = keys.shape
        M = self.subvectors
        x = keys.float().view(B, H, n, M, D // M).transpose(2, 3)  # [B, H, M, n, dsub]
        d = torch.cdist(x, self.centroids)  # [B, H, M, n, ksub]
        d = d.masked_fill(~self.used.view(B, H, 1, 1, -1), float("inf"))  # padded centroids are never chosen
        return d.argmin(-1).transpose(2, 3)  # [B, H, n, M]

    def _append(self, codes: torch.Tensor) -> None:
        B, H, n, M = codes.shape
        if self.codes is None or self.n + n > self.codes.shape[2]:
            grown = codes.new_zeros(B, H, max(self.n + n, 2 * (self.n + n)), M)
            if self.codes is not None:
                grown[:, :, : self.n] = self.codes[:, :, : self.n]
            self.codes = grown
        self.codes[:, :, self.n : self.n + n] = codes
        self.n += n

    def prepare(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:  # keys: [B, Hkv, n, D]
        self.reset()
        B, H, n, D = keys.shape
        if D % self.subvectors:
            raise ValueError(f"head_dim {D} is not divisible by subvectors={self.subvectors}")
        cpu = keys.detach().float().cpu()
        empty = (torch.zeros(self.subvectors, 1 << self.bits, D // self.subvectors), 1)
        rows = [self._train(cpu[b, h]) if n else empty for b in range(B) for h in range(H)]
        self.centroids = torch.stack([c for c, _ in rows]).view(B, H, *rows[0][0].shape).to(keys.device)
        used = torch.tensor([u for _, u in rows], device=keys.device).view(B, H, 1)
        self.used = torch.arange(1 << self.bits, device=keys.device) < used  # [B, H, ksub]
        self._append(self._encode(keys))
        self.pages.write(layout, keys.device)

    def update(self, keys: torch.Tensor, layout: PageLayout, ctx: SelectContext) -> None:
        self._append(self._encode(keys))
        self.pages.write(layout, keys.device)

    @property
    def nbytes(self) -> int:
        """Codebooks plus codes at ``bits`` bits per part and token (the packed size PQCache stores)."""
        if self.centroids is None:
            return 0
        B, H = self.centroids.shape[:2]
        return self.centroids.nbytes + B * H * self.n * math.ceil(self.subvectors * self.bits / 8)

    def select(self, query: torch.Tensor, ctx: SelectContext) -> Selection:  # query: [B, Hq, D]
        B, Hq, D = query.shape
        H, M = ctx.num_kv_heads, self.subvectors
        G = Hq // H
        P = int(ctx.num_pages.max()) if ctx.num_pages.numel() else 0
        dev = self.centroids.device
        q = query.to(dev).float().view(B, H, G, M, D // M)
        table = torch.einsum("bhgms,bhmcs->bhgmc", q, self.centroids)  # [B, H, G, M, ksub]
        codes = self.codes[:, :, : self.n].transpose(2, 3).unsqueeze(2).expand(B, H, G, M, self.n)
        approx = table.gather(-1, codes).sum(3)  # [B, H, G, n] approximate q.k per token
        scores = self.pages.reduce(approx.reshape(B, Hq, self.n), P, "max")  # [B, Hq, P]
        valid = page_valid(ctx, P, dev).repeat_interleave(G, dim=1)
        return rank_pages_per_head(scores.masked_fill(~valid, float("-inf")), H, ctx.k)
