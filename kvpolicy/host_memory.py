"""Page-locked CPU memory for the large K/V pools, set up fast.

``torch.empty(..., pin_memory=True)`` goes through ``cudaHostAlloc``, which is slow for pools of hundreds of MB,
and a 128k-token prefill of the Llama-3.1-8B shape allocates 30 such pools. Allocating ordinary memory and
page-locking it in place with ``cudaHostRegister`` is many times faster (measurements: ``docs/decode.md``).

So ``pinned_empty`` does the latter by default (``KVPOLICY_PIN=register``): a numpy buffer owns the memory, the
registration lives exactly as long as that buffer (it ends when the last tensor viewing it is gone), and the
tensor reports ``is_pinned()``. The memory is registered as mapped and portable, so kernels may read it through
its host address (unified addressing), as they read ``cudaHostAlloc`` memory; a failed registration falls back
to ``cudaHostAlloc``. ``KVPOLICY_PIN=alloc`` selects ``cudaHostAlloc`` (the caching host allocator of torch).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["PIN_ENV", "pinned_empty"]

PIN_ENV = "KVPOLICY_PIN"  # "register" (default: cudaHostRegister in place) or "alloc" (cudaHostAlloc)
_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


class _Registered(np.ndarray):
    """A uint8 buffer page-locked with cudaHostRegister; unregistered when it is freed."""

    _owner = False

    def __del__(self) -> None:
        if not self._owner:
            return
        self._owner = False
        try:
            torch.cuda.synchronize()  # no copy or kernel may still read it
            torch.cuda.cudart().cudaHostUnregister(self.ctypes.data)
        except Exception:  # noqa: BLE001 (interpreter or driver shutdown: the process frees it anyway)
            pass


def _registered(nbytes: int) -> torch.Tensor | None:
    buf = np.empty(max(nbytes, 1), dtype=np.uint8).view(_Registered)
    try:
        rt = torch.cuda.cudart()
        ok = rt.cudaHostRegister(buf.ctypes.data, buf.nbytes, _PORTABLE_MAPPED) == rt.cudaError.success
    except (RuntimeError, AttributeError, AssertionError):  # no CUDA runtime here: cudaHostAlloc decides
        return None
    if not ok:
        return None
    buf._owner = True
    return torch.from_numpy(buf)[:nbytes]


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked CPU tensor (see the module docstring)."""
    nbytes = math.prod(shape) * dtype.itemsize
    mode = os.environ.get(PIN_ENV, "register").strip() or "register"
    if mode not in ("register", "alloc"):
        raise ValueError(f"{PIN_ENV} must be 'register' or 'alloc', got {mode!r}")
    if mode == "register" and nbytes:
        raw = _registered(nbytes)
        if raw is not None:
            return raw.view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=True)
