"""How the CPU page pool stores K/V: in the model's dtype (``"auto"``) or as fp8 with per-page scales (``"fp8"``).

``"fp8"`` stores every element as ``torch.float8_e4m3fn`` (4 exponent bits, 3 mantissa bits, largest finite value
448) and, per (page, KV head), one float32 scale for K and one for V: ``scale = amax / 448`` over the page's
``S x D`` elements, ``q = x / scale`` rounded to nearest. The CPU pool then holds half the bytes of a bf16 pool
(plus 8 bytes per page and head), and a page moves to the GPU in half the bytes; it is dequantised
(``q * scale``, in float32, then rounded to the GPU slots' dtype) on the way: in the transfer, and when a
streamed prefill reads the pool back. The sink, the window and the GPU slots keep the model's dtype.

The rounding error of one element is at most ``|x| / 16`` (3 mantissa bits, round to nearest), and at most
``scale * 2**-10`` for the smallest elements of a page (e4m3's subnormals), so never above ``amax / 16``.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_MAX", "POOL_DTYPES", "check_pool_dtype", "dequantize", "quantize", "storage_dtype"]

POOL_DTYPES = ("auto", "fp8")  # "auto": the model's K/V dtype; "fp8": float8_e4m3fn with per-(page, head) scales
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_pool_dtype(name: str) -> str:
    """``name`` if it is one of ``POOL_DTYPES`` (else a ValueError listing them); for ``"fp8"``, also checks that
    this torch has ``float8_e4m3fn``."""
    if not isinstance(name, str) or name not in POOL_DTYPES:
        raise ValueError(f"unknown CPU pool dtype {name!r}; valid: {', '.join(map(repr, POOL_DTYPES))}")
    if name == "fp8" and getattr(torch, "float8_e4m3fn", None) is None:
        raise ValueError(f"cpu_pool_dtype='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks "
                         "(torch >= 2.1 has it); use cpu_pool_dtype='auto'")
    return name


def storage_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the pool's K/V elements for pool dtype ``name`` and model dtype ``dtype``."""
    return torch.float8_e4m3fn if check_pool_dtype(name) == "fp8" else dtype


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., S, D]`` float -> (q ``[..., S, D]`` float8_e4m3fn, scale ``[...]`` float32): one scale per page.
    An all-zero page gets scale 0 (it dequantises to zeros)."""
    xf = x.float()
    scale = xf.abs().amax(dim=(-2, -1)) / FP8_MAX  # [...]
    safe = scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None, None]
    q = (xf / safe).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # clamp: e4m3fn has no inf (overflow: NaN)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """q ``[..., S, D]`` and scale ``[...]`` (on q's device) -> ``[..., S, D]`` in ``dtype``; ``scale=None``: q holds
    the values already (a pool in the model's dtype), converted only if ``dtype`` differs."""
    if scale is None:
        return q.to(dtype)
    return (q.float() * scale.float()[..., None, None]).to(dtype)
