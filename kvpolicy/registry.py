"""Plugin discovery over pluggy: entry points of the group ``kvpolicy`` register classes and presets.

Built-in parts are plugins too (``kvpolicy.reference.plugin``, the core's own, which also registers every
transfer; ``kvpolicy_icecache.plugin``; ``kvpolicy_contrib.plugin``). They are registered first, by module (not
through their entry-point names), so no other distribution can shadow them; third-party entry points come after.

* A third-party plugin that registers a taken (kind, name) is reported naming both distributions and skipped
  whole; the built-in (first-registered) part keeps the name.
* A plugin that fails to import, whose hook raises, that marks a hook name kvpolicy does not define (a typo), or
  whose preset names an unknown part is reported with its name and skipped (the preset alone, for presets).
* With the environment variable ``KVPOLICY_STRICT_PLUGINS=1`` every such report raises instead (CI runs strict).
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
from kvpolicy.errors import DuplicatePluginError, PluginError, PluginLoadError, UnknownNameError, suggest
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
# (plugin name, module) of the built-in plugins, registered in this order before any entry point
BUILTIN_PLUGINS = (
    ("reference", "kvpolicy.reference.plugin"),
    ("icecache", "kvpolicy_icecache.plugin"),
    ("contrib", "kvpolicy_contrib.plugin"),
)
_PART_KINDS = ("selector", "index", "allocator", "transfer")
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


def _own_version() -> str:
    try:
        return importlib.metadata.version("kvpolicy")
    except importlib.metadata.PackageNotFoundError:
        return ""


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
        """Register the built-in plugins (by module), then every other entry point of ``group``."""
        builtin_modules = set()
        if group == hookspecs.PROJECT:
            version = _own_version()
            for name, module in BUILTIN_PLUGINS:
                builtin_modules.add(module)
                if not self._pm.has_plugin(name):
                    self._load_one(name, lambda m=module: importlib.import_module(m), "kvpolicy", version)
        seen: set[tuple[str, str, str]] = set()
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            if (dist == "kvpolicy" and ep.value in builtin_modules) or (dist, ep.name, ep.value) in seen:
                continue  # registered above by module, or the same distribution found twice on sys.path
            seen.add((dist, ep.name, ep.value))
            if self._pm.is_blocked(ep.name):
                continue
            name = ep.name if not self._pm.has_plugin(ep.name) else f"{dist}:{ep.name}"
            self._load_one(name, ep.load, dist, version)
        self._check_presets()

    def _load_one(self, name: str, load, distribution: str, version: str) -> None:
        try:
            self.register(load(), name=name, distribution=distribution, version=version)
        except Exception as e:  # a broken third-party plugin must not take the others down
            self._report(name, distribution, version, e)

    def _report(self, plugin: str, distribution: str, version: str, e: Exception) -> None:
        """Raise in strict mode, else warn and remember the skipped plugin (``kvpolicy plugins`` lists them)."""
        why = str(e) if isinstance(e, PluginError) else f"{type(e).__name__}: {e}"
        msg = f"kvpolicy plugin {plugin!r} from {distribution} {version}".rstrip() + f" skipped: {why}"
        if self.strict:
            if isinstance(e, PluginError):
                raise type(e)(msg) from e
            raise PluginLoadError(msg) from e
        warnings.warn(msg + f" (set {STRICT_ENV}=1 to raise)", RuntimeWarning, stacklevel=3)
        self.broken.append(BrokenPlugin(plugin, distribution, why))

    def _check_presets(self) -> None:
        """Drop (and report) presets that name a part nothing registered."""
        for (kind, key), entry in list(self._entries.items()):
            if kind != "preset":
                continue
            for part in _PART_KINDS:
                value = entry.obj.get(part)
                name = value.get("name") if isinstance(value, dict) else value
                if name is None or not isinstance(name, str) or (part, name) in self._entries:
                    continue
                del self._entries[(kind, key)]
                known = self.names(part)
                err = PluginLoadError(f"preset {key!r} names unknown {part} {name!r}.{suggest(name, known)}")
                self._report(entry.plugin, entry.distribution, entry.version, err)
                break

    def register(self, plugin: Any, *, name: str | None = None, distribution: str = "<local>", version: str = ""):
        """Register a plugin object (a module or any object with hookimpls). All or nothing."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._check_hooks(plugin, name)
        self._pm.register(plugin, name=name)
        try:
            new = self._collect(plugin, name, distribution, version)
        except BaseException:
            self._pm.unregister(plugin)
            raise
        self._entries.update(new)
        return name

    def _check_hooks(self, plugin: Any, name: str) -> None:
        """A marked function with a name kvpolicy does not define, or a hook function left unmarked, is an error."""
        known = sorted(_HOOKS.values())
        for attr in dir(plugin):
            marked = self._pm.parse_hookimpl_opts(plugin, attr) is not None
            if marked and attr not in known:
                raise PluginLoadError(f"plugin {name!r}: {attr!r} is not a kvpolicy hook.{suggest(attr, known)}")
            if not marked and attr in known and callable(getattr(plugin, attr, None)):
                raise PluginLoadError(f"plugin {name!r}: {attr!r} is not marked with @kvpolicy.hookimpl")

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
                            f"{other.plugin!r}) and by {distribution} (plugin {name!r}); the first keeps the name"
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
