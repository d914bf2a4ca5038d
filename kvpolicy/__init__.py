"""kvpolicy: query-aware KV-cache selection with the cache in CPU memory.

Public API: ``generate``, ``Policy``, ``KVPolicyCache``, the part interfaces and result types, and the
plugin registry (``get_registry``, ``hookimpl``). Every name loads on first use (a module ``__getattr__``), so
``import kvpolicy`` and ``kvpolicy --help`` import neither torch nor transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Budget": "kvpolicy.types",
    "GenerationResult": "kvpolicy.generation",
    "Index": "kvpolicy.interfaces",
    "KVPolicyCache": "kvpolicy.hf",
    "PageAllocator": "kvpolicy.interfaces",
    "PageLayout": "kvpolicy.types",
    "PartSpec": "kvpolicy.policy",
    "Policy": "kvpolicy.policy",
    "Reservation": "kvpolicy.types",
    "SearchParams": "kvpolicy.types",
    "SelectContext": "kvpolicy.types",
    "Selection": "kvpolicy.types",
    "Selector": "kvpolicy.interfaces",
    "Transfer": "kvpolicy.interfaces",
    "TransferHandle": "kvpolicy.types",
    "generate": "kvpolicy.generation",
    "get_registry": "kvpolicy.registry",
    "hookimpl": "kvpolicy.hookspecs",
}

__all__ = [
    "Budget",
    "GenerationResult",
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
]  # the keys of _EXPORTS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # names for type checkers and IDEs; at run time they load through __getattr__
    from kvpolicy.generation import GenerationResult, generate
    from kvpolicy.hf import KVPolicyCache
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
