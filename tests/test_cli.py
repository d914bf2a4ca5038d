"""The command line: `kvpolicy --help` starts without torch, and `kvpolicy demo` picks its policies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpolicy import cli
from kvpolicy.eval import demo
from kvpolicy.registry import get_registry

HEAVY = ("torch", "transformers", "numpy", "pluggy", "rich")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["generate", "--help"]])
def test_help_imports_no_torch(argv, tmp_path):
    code = (
        "import sys\n"
        "from kvpolicy.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print('loaded:', *sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "loaded:", out.stdout[-500:]


def test_help_of_the_installed_command_imports_no_torch(tmp_path):
    """The `kvpolicy` script itself, under PYTHONPROFILEIMPORTTIME (`-X importtime`), which lists every import."""
    script = Path(sys.executable).parent / "kvpolicy"
    if not script.is_file():
        pytest.skip(f"no kvpolicy script beside {sys.executable} (not installed with pip)")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "kvpolicy.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_texts_agree_with_the_demo_module():
    assert cli.DEMO_POLICIES == demo.DEFAULT_POLICIES
    assert cli.DEMO_DEPTHS == demo.DEFAULT_DEPTHS
    assert cli.DEMO_SEED == demo.DEFAULT_SEED
    assert cli.DEMO_NEW_TOKENS == demo.DEFAULT_NEW_TOKENS


def test_default_demo_policies_are_installed_presets():
    presets = get_registry().names("preset")
    assert 3 <= len(demo.demo_policies()) <= 5
    assert set(demo.demo_policies()) <= set(presets)
    every = demo.demo_policies(every_preset=True)
    assert sorted(every) == sorted(presets) and every[:3] == list(demo.BASE_POLICIES)


def _policies_run_by(argv, monkeypatch) -> list[str]:
    """The policies `kvpolicy demo ARGV` hands to the demo (model loading and the run itself stubbed out)."""
    seen: list[str] = []

    def fake_run(model, tok, *, policies, **kw):
        seen.extend(policies)
        return []

    monkeypatch.setattr(cli, "_load", lambda args: (None, None))
    monkeypatch.setattr(demo, "run_passkey_demo", fake_run)
    monkeypatch.setattr(demo, "render_demo_table", lambda rows, budgets: "table")
    assert cli.main(["demo", *argv]) == 0
    return seen


def test_demo_runs_the_default_policies(monkeypatch):
    assert _policies_run_by([], monkeypatch) == list(demo.DEFAULT_POLICIES)


def test_demo_all_runs_every_preset(monkeypatch):
    assert _policies_run_by(["--all"], monkeypatch) == demo.demo_policies(every_preset=True)


def test_demo_policy_narrows(monkeypatch):
    assert _policies_run_by(["--policy", "full,quest"], monkeypatch) == ["full", "quest"]


def test_demo_policy_and_all_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--all", "--policy", "full"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_demo_rejects_an_unknown_policy_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["demo", "--policy", "ful"]) == 2
    assert "ful" in capsys.readouterr().err
