"""kvpolicy: query-aware KV-cache selection with the cache in CPU memory.

Public API: ``generate``, ``Policy``, ``KVPolicyCache``, the part interfaces and result types, and the
plugin registry (``get_registry``, ``hookimpl``). Heavy modules (transformers integration) load lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from kvpolicy.hookspecs import hookimpl
from kvpolicy.interfaces import Index, PageAllocator, Selector, Transfer
from kvpolicy.policy import PartSpec, Policy
from kvpolicy.registry import get_registry
from kvpolicy.types import (
    Budget,
    PageLayout,
    Reservation,
    SearchParams,
    SelectContext,
    Selection,
    TransferHandle,
)

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Index",
    "KVPolicyCache",
    "PageAllocator",
    "PageLayout",
    "PartSpec",
    "Policy",
    "Reservation",
    "SearchParams",
    "SelectContext",
    "Selection",
    "Selector",
    "Transfer",
    "TransferHandle",
    "generate",
    "get_registry",
    "hookimpl",
]

_LAZY = {"generate": "kvpolicy.generation", "KVPolicyCache": "kvpolicy.hf", "GenerationResult": "kvpolicy.generation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")
