"""Plugin discovery: entry points, third-party packages, duplicates, broken plugins, suggestions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from kvpolicy.errors import DuplicatePluginError, PluginLoadError, UnknownNameError
from kvpolicy.registry import Registry

BUILTIN = {
    ("index", "exact"), ("selector", "full"), ("selector", "oracle"), ("selector", "streaming"),
    ("selector", "index_topk"), ("allocator", "lru"), ("transfer", "sync"), ("preset", "full"),
}

SELECTOR_SRC = '''
from dataclasses import dataclass
from typing import ClassVar
import torch
import kvpolicy
from kvpolicy.types import Selection

@dataclass(kw_only=True)
class {cls}(kvpolicy.Selector):
    name: ClassVar[str] = "{name}"
    def select(self, query, ctx):
        B, H = ctx.num_pages.shape
        return Selection(page_ids=torch.full((B, H, 0), -1, dtype=torch.int64))

@kvpolicy.hookimpl
def kvpolicy_register_selectors():
    return [{cls}]
'''


def _install(tmp_path, dist: str, module: str, source: str) -> str:
    """Build and install a real distribution with a ``kvpolicy`` entry point into a private target dir."""
    src = tmp_path / f"src_{module}"
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(textwrap.dedent(source))
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "1.2.3"
        [project.entry-points.kvpolicy]
        {module} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    """))
    target = tmp_path / f"site_{module}"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        check=True, capture_output=True,
    )
    return str(target)


def test_builtins_are_registered_through_entry_points():
    reg = Registry()
    assert BUILTIN <= {(e.kind, e.name) for e in reg.entries()}
    assert reg.entry("selector", "oracle").distribution == "kvpolicy"
    assert not reg.broken


def test_third_party_plugin_is_discovered(tmp_path, monkeypatch):
    target = _install(tmp_path, "kvp-thirdparty", "kvp_thirdparty", SELECTOR_SRC.format(cls="Mine", name="mine"))
    monkeypatch.syspath_prepend(target)
    reg = Registry(strict=True)
    entry = reg.entry("selector", "mine")
    assert (entry.distribution, entry.version) == ("kvp-thirdparty", "1.2.3")
    from kvpolicy.policy import Policy

    pol = Policy(selector="mine", budget=128, registry=reg)
    assert pol.make_parts().selector.name == "mine"


def test_duplicate_name_is_skipped_naming_both_distributions(tmp_path, monkeypatch):
    target = _install(tmp_path, "kvp-dup", "kvp_dup", SELECTOR_SRC.format(cls="Dup", name="oracle"))
    monkeypatch.syspath_prepend(target)
    with pytest.raises(DuplicatePluginError) as err:
        Registry(strict=True)
    assert "kvpolicy" in str(err.value) and "kvp-dup" in str(err.value) and "'oracle'" in str(err.value)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        reg = Registry(strict=False)  # a real installed distribution: the built-in keeps the name
    assert reg.entry("selector", "oracle").distribution == "kvpolicy"
    assert [b.distribution for b in reg.broken] == ["kvp-dup"]


def test_broken_plugin_is_reported_and_skipped_unless_strict(tmp_path, monkeypatch):
    target = _install(tmp_path, "kvp-broken", "kvp_broken", "import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(target)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        reg = Registry(strict=False)
    assert [b.plugin for b in reg.broken] == ["kvp_broken"]
    assert any("kvp_broken" in str(x.message) and "kvp-broken" in str(x.message) for x in w)
    assert ("selector", "oracle") in reg  # the others still load
    with pytest.raises(PluginLoadError, match="kvp_broken"):
        Registry(strict=True)
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError):
        Registry()


def test_unknown_name_suggests_close_matches():
    reg = Registry()
    with pytest.raises(UnknownNameError, match="Did you mean 'oracle'"):
        reg.get("selector", "oracel")
    with pytest.raises(ValueError, match="unknown kind"):
        reg.get("widget", "x")


def test_in_process_registration_is_all_or_nothing():
    import kvpolicy
    from kvpolicy.reference.full_selector import FullSelector

    class Plugin:
        @kvpolicy.hookimpl
        def kvpolicy_register_selectors(self):
            return [FullSelector]  # name 'full' is taken

        @kvpolicy.hookimpl
        def kvpolicy_register_presets(self):
            return {"brand-new": {"selector": "full"}}

    reg = Registry()
    with pytest.raises(DuplicatePluginError):
        reg.register(Plugin(), name="dup-local")
    assert ("preset", "brand-new") not in reg

    class NotAPart:
        name = "x"

    class Bad:
        @kvpolicy.hookimpl
        def kvpolicy_register_indexes(self):
            return [NotAPart]

    with pytest.raises(PluginLoadError, match="not a Index subclass"):
        reg.register(Bad(), name="bad")
