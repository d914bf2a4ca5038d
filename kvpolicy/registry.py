"""Plugin discovery over pluggy: entry points of the group ``kvpolicy`` register classes and presets.

Built-in parts are plugins too (``kvpolicy.reference.plugin``, the core's own, which also registers every
transfer; ``kvpolicy_icecache.plugin``; ``kvpolicy_contrib.plugin``), loaded through the same entry points as
third-party ones.

* A duplicate (kind, name) is an error naming both distributions; nothing of the offending plugin is kept.
* A plugin that fails to import (or whose hook raises) is reported with its name and skipped; with the
  environment variable ``KVPOLICY_STRICT_PLUGINS=1`` it re-raises (CI runs strict).
* Lookups of unknown names suggest close matches.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from kvpolicy import hookspecs
from kvpolicy.errors import DuplicatePluginError, PluginLoadError, UnknownNameError, suggest
from kvpolicy.interfaces import Index, PageAllocator, Selector, Transfer

__all__ = ["BrokenPlugin", "Entry", "Registry", "get_registry", "reset_registry", "STRICT_ENV"]

STRICT_ENV = "KVPOLICY_STRICT_PLUGINS"
KINDS = ("index", "selector", "allocator", "transfer", "preset")
_HOOKS = {
    "index": "kvpolicy_register_indexes",
    "selector": "kvpolicy_register_selectors",
    "allocator": "kvpolicy_register_allocators",
    "transfer": "kvpolicy_register_transfers",
    "preset": "kvpolicy_register_presets",
}
_BASES = {"index": Index, "selector": Selector, "allocator": PageAllocator, "transfer": Transfer}


@dataclass(frozen=True)
class Entry:
    """One registered part or preset."""

    kind: str
    name: str
    obj: Any  # the class, or the preset dict
    plugin: str
    distribution: str
    version: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "distribution": self.distribution, "version": self.version}


@dataclass(frozen=True)
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str


def _strict_default() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


_PLURAL = {"index": "indexes"}


class Registry:
    """All registered parts and presets, keyed by (kind, name)."""

    def __init__(self, *, load_entrypoints: bool = True, strict: bool | None = None):
        self.strict = _strict_default() if strict is None else strict
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._entries: dict[tuple[str, str], Entry] = {}
        self.broken: list[BrokenPlugin] = []
        if load_entrypoints:
            self.load_entrypoints()

    # ------------------------------------------------------------ loading
    def load_entrypoints(self, group: str = hookspecs.PROJECT) -> None:
        """Import every entry point of ``group`` and register what its hooks return."""
        eps = sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name)
        for ep in eps:
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            if self._pm.has_plugin(ep.name) or self._pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
                self.register(module, name=ep.name, distribution=dist, version=version)
            except DuplicatePluginError:
                raise
            except Exception as e:  # a broken third-party plugin must not take the others down
                msg = f"kvpolicy plugin {ep.name!r} from {dist} {version} failed to load: {type(e).__name__}: {e}"
                if self.strict:
                    raise PluginLoadError(msg) from e
                warnings.warn(msg + f" (skipped; set {STRICT_ENV}=1 to raise)", RuntimeWarning, stacklevel=2)
                self.broken.append(BrokenPlugin(ep.name, dist, f"{type(e).__name__}: {e}"))

    def register(self, plugin: Any, *, name: str | None = None, distribution: str = "<local>", version: str = ""):
        """Register a plugin object (a module or any object with hookimpls). All or nothing."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._pm.register(plugin, name=name)
        try:
            new = self._collect(plugin, name, distribution, version)
        except BaseException:
            self._pm.unregister(plugin)
            raise
        self._entries.update(new)
        return name

    def _collect(self, plugin, name, distribution, version) -> dict[tuple[str, str], Entry]:
        new: dict[tuple[str, str], Entry] = {}
        for kind, hook in _HOOKS.items():
            for impl in getattr(self._pm.hook, hook).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                result = impl.function() or ([] if kind != "preset" else {})
                items = result.items() if kind == "preset" else ((self._part_name(kind, c, name), c) for c in result)
                for key, obj in items:
                    if kind == "preset" and not isinstance(obj, dict):
                        raise PluginLoadError(f"plugin {name!r}: preset {key!r} must be a dict, got {type(obj).__name__}")
                    entry = Entry(kind, key, obj, name, distribution, version)
                    other = self._entries.get((kind, key)) or new.get((kind, key))
                    if other is not None:
                        raise DuplicatePluginError(
                            f"{kind} {key!r} is registered twice: by {other.distribution} (plugin "
                            f"{other.plugin!r}) and by {distribution} (plugin {name!r}); rename one of them"
                        )
                    new[(kind, key)] = entry
        return new

    @staticmethod
    def _part_name(kind: str, cls: Any, plugin: str) -> str:
        base = _BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginLoadError(f"plugin {plugin!r}: {cls!r} registered as {kind} is not a {base.__name__} subclass")
        part = getattr(cls, "name", None)
        if not isinstance(part, str) or not part:
            raise PluginLoadError(f"plugin {plugin!r}: {cls.__name__} has no string ClassVar 'name'")
        return part

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != name}

    # ------------------------------------------------------------ lookup
    def get(self, kind: str, name: str) -> Any:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        entry = self._entries.get((kind, name))
        if entry is None:
            known = self.names(kind)
            raise UnknownNameError(
                f"unknown {kind} {name!r}.{suggest(name, known)} Registered {_PLURAL.get(kind, kind + 's')}: {', '.join(known) or 'none'}"
            )
        return entry.obj

    def entry(self, kind: str, name: str) -> Entry:
        self.get(kind, name)
        return self._entries[(kind, name)]

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._entries if k == kind)

    def entries(self) -> list[Entry]:
        order = {k: i for i, k in enumerate(KINDS)}
        return sorted(self._entries.values(), key=lambda e: (order[e.kind], e.name))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry (the next ``get_registry`` reloads entry points)."""
    global _REGISTRY
    _REGISTRY = None
