"""pluggy hook specifications of the ``kvpolicy`` entry-point group.

A plugin is a module named by an entry point in the group ``kvpolicy``; it implements any of these hooks
with ``@kvpolicy.hookimpl``. Each hook returns classes (or preset dicts); the registry calls them once at
load time, never on the decode path::

    [project.entry-points.kvpolicy]
    mine = "my_package.plugin"
"""

from __future__ import annotations

import pluggy

PROJECT = "kvpolicy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvpolicy_register_indexes() -> list[type]:
    """Return ``Index`` subclasses to register, each with a unique ``name``."""


@hookspec
def kvpolicy_register_selectors() -> list[type]:
    """Return ``Selector`` subclasses to register, each with a unique ``name``."""


@hookspec
def kvpolicy_register_allocators() -> list[type]:
    """Return ``PageAllocator`` subclasses to register, each with a unique ``name``."""


@hookspec
def kvpolicy_register_transfers() -> list[type]:
    """Return ``Transfer`` subclasses to register, each with a unique ``name``."""


@hookspec
def kvpolicy_register_presets() -> dict[str, dict]:
    """Return named policy configurations, ``{name: {"selector": {...}, "index": {...}, ...}}``
    (the same dict ``Policy.from_config`` takes)."""
