"""Every registered part runs its conformance suite (one sweep over the registry)."""

from __future__ import annotations

from kvpolicy.registry import get_registry
from kvpolicy.testing import AllocatorConformance, IndexConformance, SelectorConformance, TransferConformance

_SUITES = {
    "index": (IndexConformance, "index_cls"),
    "selector": (SelectorConformance, "selector_cls"),
    "allocator": (AllocatorConformance, "allocator_cls"),
    "transfer": (TransferConformance, "transfer_cls"),
}

_reg = get_registry()
for _kind, (_suite, _attr) in _SUITES.items():
    for _name in _reg.names(_kind):
        _cls = _reg.get(_kind, _name)
        _test = f"Test{_kind.capitalize()}_{_name.replace('-', '_')}"
        globals()[_test] = type(_test, (_suite,), {_attr: _cls, **getattr(_cls, "conformance", {})})


def test_every_part_is_swept():
    swept = {n for n in globals() if n.startswith("Test")}
    for kind in _SUITES:
        for name in _reg.names(kind):
            assert f"Test{kind.capitalize()}_{name.replace('-', '_')}" in swept
