"""Input checks shared by the kernel launchers; triton-free, so they run (and are tested) anywhere.

Every check raises ``TypeError`` (not a tensor, wrong dtype) or ``ValueError`` (wrong rank, shape or
device) with the argument's name and the expected layout in the message.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "check_device",
    "check_int",
    "check_paged_attention_inputs",
    "check_rank",
    "check_same_float",
    "check_shape",
    "interpreting",
]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_rank(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_same_float(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    """``ref`` is float16/bfloat16/float32 and every other tensor has its dtype."""
    if ref.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{ref_name} must be float16, bfloat16 or float32, got {ref.dtype}")
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_device(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every tensor is on ``ref``'s device, which is CUDA (or any device under the Triton interpreter)."""
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if ref.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, {ref_name} is on {ref.device} "
            "(use the torch reference, or set TRITON_INTERPRET=1 before importing triton to interpret on CPU)"
        )


def check_paged_attention_inputs(
    q, sink_k, sink_v, slot_k, slot_v, slot_len, slots, win_k, win_v, softcap=None
) -> tuple[int, int, int, int, int, int, int, int, int]:
    """Check the arguments of paged decode attention; returns ``(B, Hq, Hkv, D, Ts, N, S, K, Tw)``."""
    check_rank("q", q, 3, "[B, Hq, D]")
    for name, t in (("sink_k", sink_k), ("sink_v", sink_v), ("win_k", win_k), ("win_v", win_v)):
        check_rank(name, t, 4, "[B, Hkv, T, D]")
    check_rank("slot_k", slot_k, 5, "[B, Hkv, N, S, D]")
    check_rank("slot_v", slot_v, 5, "[B, Hkv, N, S, D]")
    check_rank("slot_len", slot_len, 3, "[B, Hkv, N]")
    check_rank("slots", slots, 3, "[B, Hkv, K]")
    check_same_float("q", q, sink_k=sink_k, sink_v=sink_v, slot_k=slot_k, slot_v=slot_v, win_k=win_k, win_v=win_v)
    check_int("slot_len", slot_len)
    check_int("slots", slots)
    B, Hq, D = q.shape
    _, H, N, S, _ = slot_k.shape
    Ts, Tw, K = sink_k.shape[2], win_k.shape[2], slots.shape[2]
    if H < 1 or Hq % H:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of the KV heads Hkv={H} (slot_k.shape[1])")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D={D} must be in 1..256")
    check_shape("slot_k", slot_k, (B, H, N, S, D), "[B, Hkv, N, S, D]")
    check_shape("slot_v", slot_v, (B, H, N, S, D), "[B, Hkv, N, S, D]")
    check_shape("sink_k", sink_k, (B, H, Ts, D), "[B, Hkv, Ts, D]")
    check_shape("sink_v", sink_v, (B, H, Ts, D), "[B, Hkv, Ts, D]")
    check_shape("win_k", win_k, (B, H, Tw, D), "[B, Hkv, Tw, D]")
    check_shape("win_v", win_v, (B, H, Tw, D), "[B, Hkv, Tw, D]")
    check_shape("slot_len", slot_len, (B, H, N), "[B, Hkv, N]")
    check_shape("slots", slots, (B, H, K), "[B, Hkv, K]")
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    check_device(
        "q", q, sink_k=sink_k, sink_v=sink_v, slot_k=slot_k, slot_v=slot_v, slot_len=slot_len, slots=slots,
        win_k=win_k, win_v=win_v,
    )
    return B, Hq, H, D, Ts, N, S, K, Tw
