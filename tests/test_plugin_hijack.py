"""Issue 20, item 3: third-party plugins cannot crash kvpolicy or replace built-ins (entry points faked through
``importlib.metadata``)."""

from __future__ import annotations

import importlib.metadata
import types
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import kvpolicy
from kvpolicy.errors import DuplicatePluginError, PluginLoadError
from kvpolicy.reference.oracle_selector import OracleSelector
from kvpolicy.registry import Registry, reset_registry
from kvpolicy.types import Selection


@dataclass(kw_only=True)
class FakeOracle(kvpolicy.Selector):
    """Selects no pages, under a built-in's name."""

    name: ClassVar[str] = "oracle"

    def select(self, query, ctx):
        B, H = ctx.num_pages.shape
        return Selection(page_ids=torch.full((B, H, 0), -1, dtype=torch.int64))


def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for attr, fn in hooks.items():
        setattr(mod, attr, fn)
    return mod


def _selectors(*classes):
    return kvpolicy.hookimpl(lambda: list(classes))


class _FakeEntryPoint:
    def __init__(self, name: str, dist: str, module: types.ModuleType):
        self.name, self.value, self.group = name, f"{dist.replace('-', '_')}.plugin", "kvpolicy"
        self.dist = types.SimpleNamespace(metadata={"Name": dist}, version="9.9")
        self._module = module

    def load(self):
        return self._module


@pytest.fixture
def fake_plugins(monkeypatch):
    """Add fake entry points (listed before the real ones) to the ``kvpolicy`` group."""
    real = importlib.metadata.entry_points
    fakes: list[_FakeEntryPoint] = []

    def entry_points(**kw):
        found = list(real(**kw))
        return [*fakes, *found] if kw.get("group") == "kvpolicy" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    reset_registry()
    yield lambda name, dist, module: fakes.append(_FakeEntryPoint(name, dist, module))
    reset_registry()


def _load(strict: bool) -> tuple[Registry, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        reg = Registry(strict=strict)
    return reg, [str(x.message) for x in w]


def test_third_party_duplicate_is_skipped_and_the_builtin_keeps_the_name(fake_plugins):
    fake_plugins("aaa", "kvp-fake", _module("aaa", kvpolicy_register_selectors=_selectors(FakeOracle)))
    reg, warned = _load(strict=False)
    assert reg.get("selector", "oracle") is OracleSelector
    assert [(b.plugin, b.distribution) for b in reg.broken] == [("aaa", "kvp-fake")]
    assert any("'aaa' from kvp-fake 9.9 skipped" in m and "by kvpolicy (plugin 'reference')" in m for m in warned)
    with pytest.raises(DuplicatePluginError, match="plugin 'aaa' from kvp-fake 9.9 skipped: selector 'oracle'"):
        Registry(strict=True)  # the third party is blamed, not the built-in


def test_entry_point_named_like_a_builtin_cannot_replace_it(fake_plugins):
    fake_plugins("reference", "kvp-hijack", _module("hijack", kvpolicy_register_selectors=_selectors(FakeOracle)))
    reg, warned = _load(strict=False)
    assert reg.get("selector", "oracle") is OracleSelector
    assert reg.entry("selector", "oracle").distribution == "kvpolicy"
    assert [b.distribution for b in reg.broken] == ["kvp-hijack"]
    with pytest.raises(DuplicatePluginError, match="kvp-hijack"):
        Registry(strict=True)


def test_misspelled_hook_is_a_load_error(fake_plugins):
    fake_plugins("typo", "kvp-typo", _module("typo", kvpolicy_register_selector=_selectors(FakeOracle)))
    reg, warned = _load(strict=False)
    assert [b.plugin for b in reg.broken] == ["typo"]
    assert "Did you mean 'kvpolicy_register_selectors'" in reg.broken[0].error
    with pytest.raises(PluginLoadError, match="'kvpolicy_register_selector' is not a kvpolicy hook"):
        Registry(strict=True)


def test_unmarked_hook_is_a_load_error(fake_plugins):
    fake_plugins("unmarked", "kvp-unmarked", _module("unmarked", kvpolicy_register_presets=lambda: {"x": {}}))
    with pytest.raises(PluginLoadError, match="not marked with @kvpolicy.hookimpl"):
        Registry(strict=True)


def test_preset_naming_an_unknown_part_is_a_load_error(fake_plugins):
    presets = kvpolicy.hookimpl(lambda: {"mine": {"selector": "oracel"}, "ok": {"selector": {"name": "oracle"}}})
    fake_plugins("presets", "kvp-presets", _module("presets", kvpolicy_register_presets=presets))
    reg, warned = _load(strict=False)
    assert ("preset", "mine") not in reg and ("preset", "ok") in reg
    assert "preset 'mine' names unknown selector 'oracel'. Did you mean 'oracle'?" in reg.broken[0].error
    with pytest.raises(PluginLoadError, match="preset 'mine' names unknown selector 'oracel'"):
        Registry(strict=True)


def test_plugins_command_runs_in_strict_mode_and_lists_what_was_skipped(fake_plugins, monkeypatch, capsys):
    from kvpolicy.cli import main

    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    fake_plugins("aaa", "kvp-fake", _module("aaa", kvpolicy_register_selectors=_selectors(FakeOracle)))
    assert main(["plugins", "--json"]) == 0
    out = capsys.readouterr()
    assert '"oracle"' in out.out
    assert "skipped plugin 'aaa' (kvp-fake): selector 'oracle' is registered twice" in out.err


def test_other_commands_report_a_strict_plugin_error_in_one_line(fake_plugins, monkeypatch, capsys):
    from kvpolicy.cli import main

    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    fake_plugins("aaa", "kvp-fake", _module("aaa", kvpolicy_register_selectors=_selectors(FakeOracle)))
    assert main(["generate", "--prompt", "hi", "--policy", "oracle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvpolicy generate: error: kvpolicy plugin 'aaa'")
