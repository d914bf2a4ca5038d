"""The README's selector example runs, and the CLI page documents real subcommands."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.cli import build_parser
from kvpolicy.registry import get_registry

ROOT = Path(__file__).resolve().parents[1]


def _section_code(md: str, heading: str) -> str:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_readme_selector_example_runs():
    code = _section_code((ROOT / "README.md").read_text(), "Writing a selector")
    module = types.ModuleType("readme_example")  # dataclasses look their module up in sys.modules
    sys.modules["readme_example"] = module
    ns = module.__dict__
    try:
        exec(compile(code, "README.md", "exec"), ns)
        assert ns["policy"].selector.name == "mean_key"
        from tests.conftest import tiny_model

        model = tiny_model("llama")
        ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
        res = kvpolicy.generate(model, ids, policy={"selector": "mean_key"}, budget=128, max_new_tokens=20,
                                validate=True)
        assert res.new_tokens == 20 and res.stats["pages_selected"] > 0
    finally:
        get_registry().unregister("mean-key-example")
        sys.modules.pop("readme_example", None)
    assert ("selector", "mean_key") not in get_registry()


def test_documented_cli_commands_exist():
    text = (ROOT / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"`kvpolicy (\w+)", text))
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert documented and documented <= set(sub.choices)
