"""Exact attention of a block of queries over K/V that arrive in pieces (streamed prefill, continued prompts).

A prompt chunk attends to every earlier token of its layer, which may live on the GPU (sink, window, a dense
layer's cache) or in the pinned CPU pool (pages, in any order and partly filled), and causally to itself. No
piece needs the others: each gives a partial softmax (output and log-sum-exp per query), and partials merge
exactly (``Partial.merge``). So the earlier tokens can stream through the GPU a block at a time and the GPU never
holds a whole layer's past, nor a ``[queries, keys]`` mask.

Shapes: q ``[B, Hq, L, D]``, k/v ``[B, Hkv, n, D]`` with ``Hq % Hkv == 0``, ``valid`` ``[B, Hkv, n]`` bool (keys
that count; pages are partly filled). A non-causal piece folds the GQA group into the query axis
(``[B, Hkv, G*L, D]``), so K/V are never repeated; the causal piece (the chunk itself) repeats its own K/V.

Each piece runs one fused kernel that also returns the log-sum-exp: torch's flash attention on CUDA (its
memory-efficient attention where a piece has invalid keys, or in fp32), its flash attention on the CPU; ``reference_partial`` (plain math in fp32) is the definition, used with a logit
softcap and by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Partial", "partial_attention", "reference_partial"]


@dataclass
class Partial:
    """Softmax attention over some keys: ``out`` ``[B, Hq, L, D]`` fp32 (normalised over those keys) and ``lse``
    ``[B, Hq, L]`` fp32 (log of the sum of their exp-scores; ``-inf`` where no key counted)."""

    out: torch.Tensor
    lse: torch.Tensor

    def output(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention output in transformers' layout, ``[B, L, Hq, D]`` in ``dtype``."""
        return self.out.to(dtype).transpose(1, 2).contiguous()

    def merge(self, other: Partial) -> Partial:
        """Attention over the union of both key sets (exact)."""
        lse = torch.logaddexp(self.lse, other.lse)
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # no key in either: weights 0
        w1 = torch.exp(self.lse - safe).unsqueeze(-1)
        w2 = torch.exp(other.lse - safe).unsqueeze(-1)
        out = torch.nan_to_num(self.out) * w1 + torch.nan_to_num(other.out) * w2
        return Partial(out, lse)


def _fold(q: torch.Tensor, hkv: int) -> torch.Tensor:
    B, Hq, L, D = q.shape  # -> [B, Hkv, G*L, D]: head h = kv*G + g attends with KV head kv
    return q.reshape(B, hkv, (Hq // hkv) * L, D)


def _unfold(x: torch.Tensor, hq: int, L: int) -> torch.Tensor:
    B = x.shape[0]  # [B, Hkv, G*L, ...] -> [B, Hq, L, ...]
    return x.reshape(B, hq, L, *x.shape[3:])


def _bias(valid: torch.Tensor | None, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive bias ``[B, Hkv, rows, n]`` (-inf on invalid keys), broadcast over queries without a copy; its
    storage is padded to a multiple of 16 keys (the fused kernels want aligned rows)."""
    if valid is None:
        return None
    B, H, n = valid.shape
    n16 = -(-n // 16) * 16
    b = torch.zeros((B, H, 1, n16), dtype=dtype, device=valid.device)
    b[..., :n].masked_fill_(~valid.unsqueeze(2), float("-inf"))
    return b[..., :n].expand(B, H, rows, n)


def reference_partial(q, k, v, *, scale: float, valid=None, causal: bool = False, softcap: float | None = None):
    """The definition in fp32 (see the module docstring for shapes)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhld,bhnd->bhln", q.float(), kf) * scale  # [B, Hq, L, n]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if valid is not None:
        s = s.masked_fill(~valid.repeat_interleave(G, dim=1).unsqueeze(2), float("-inf"))
    if causal:
        n = k.shape[2]
        allowed = torch.ones(L, n, dtype=torch.bool, device=q.device).tril(n - L)  # query i sees keys <= n-L+i
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, L]
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return Partial(torch.einsum("bhln,bhnd->bhld", p, vf), lse)


def _fused(q, k, v, bias, causal: bool, scale: float):
    """One fused kernel with log-sum-exp: (out [B, H, L, D], lse [B, H, L]); q, k, v with equal heads. On CUDA:
    flash attention where it applies (no bias, half precision, D <= 256), else memory-efficient attention."""
    if q.is_cuda and bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]  # the kernel pads the log-sum-exp rows
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    return out, lse


def partial_attention(q, k, v, *, scale: float, valid=None, causal: bool = False, softcap: float | None = None):
    """``Partial`` of ``q`` over ``k``/``v`` (``valid`` keys only; ``causal``: the last ``L`` keys are the
    queries' own tokens, query i seeing keys up to its own position). Shapes in the module docstring."""
    B, Hq, L, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if n == 0:
        return Partial(q.new_zeros((B, Hq, L, D), dtype=torch.float32),
                       torch.full((B, Hq, L), float("-inf"), device=q.device))
    if softcap is not None or (causal and n != L):
        return reference_partial(q, k, v, scale=scale, valid=valid, causal=causal, softcap=softcap)
    v = v.to(q.dtype)
    k = k.to(q.dtype)
    if causal:  # the chunk itself: [B, Hq, L, D] with its own K/V repeated per query head
        G = Hq // Hkv
        out, lse = _fused(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), None, True, scale)
        return Partial(out.float(), lse.float())
    qf = _fold(q, Hkv)
    out, lse = _fused(qf, k, v, _bias(valid, qf.shape[2], q.dtype), False, scale)
    lse = lse.float()
    if valid is not None:  # a row with no valid key: its kernel output is undefined; make it empty
        none = ~valid.any(-1)  # [B, Hkv]
        lse = lse.masked_fill(none.unsqueeze(-1), float("-inf"))
    return Partial(_unfold(out.float(), Hq, L), _unfold(lse, Hq, L))
