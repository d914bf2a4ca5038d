"""Exceptions with messages that name the problem and, where there is one, the fix."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable

__all__ = [
    "DuplicatePluginError",
    "HostMemoryError",
    "MissingDependencyError",
    "PluginError",
    "PluginLoadError",
    "UnknownNameError",
    "UnsupportedModelError",
    "require",
    "suggest",
]


class PluginError(Exception):
    """Base class of registry errors."""


class PluginLoadError(PluginError):
    """A plugin module failed to import or its hook failed (raised in strict mode)."""


class DuplicatePluginError(PluginError):
    """Two distributions register the same (kind, name)."""


class UnknownNameError(PluginError, ValueError):
    """An index/selector/allocator/transfer/preset name that nothing registered."""


class UnsupportedModelError(ValueError):
    """A model architecture kvpolicy cannot run."""


class HostMemoryError(MemoryError):
    """A CPU page pool could not allocate the memory it grows into (the message names the bytes asked for and
    the bytes held)."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message gives the install command."""


def suggest(name: str, known: Iterable[str]) -> str:
    """' Did you mean ...?' with close matches, or ''."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def require(module: str, *, extra: str | None = None, package: str | None = None, why: str = ""):
    """Import an optional dependency or raise ``MissingDependencyError`` with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        cmd = f"pip install 'kvpolicy[{extra}]'" if extra else f"pip install {package or module}"
        raise MissingDependencyError(
            f"{why or 'this feature'} needs the optional dependency {module!r}, which is not installed: "
            f"run `{cmd}`"
        ) from e
