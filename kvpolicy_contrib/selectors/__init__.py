"""Baseline selectors from the IceCache paper's tables, plus Quest (one class per module)."""

from __future__ import annotations


def selector_classes() -> list[type]:
    """The contrib ``Selector`` classes."""
    return []


def presets() -> dict[str, dict]:
    """Named policies for the baselines (``Policy.preset(name, budget=...)``)."""
    return {}
