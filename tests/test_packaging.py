"""Packaging: the Triton kernels install as ``kvpolicy_kernels`` and never shadow Hugging Face's ``kernels``
distribution (which transformers >= 5.25 imports when it loads), from any working directory."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_no_top_level_kernels_package_in_the_repository():
    # kernels/ is a plain folder (no __init__.py): from the repository root it can only be a namespace portion,
    # which any installed regular package named `kernels` takes precedence over
    assert not (REPO / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("kvpolicy_kernels._checks")
    assert spec is not None and Path(spec.origin).parent == REPO / "kernels"


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_transformers_kvpolicy_and_hub_kernels_in_one_process(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    hub = importlib.util.find_spec("kernels") is not None and _run(
        "import kernels, sys; sys.exit(0 if hasattr(kernels, 'get_kernel') else 1)", tmp_path).returncode == 0
    code = (
        "import transformers, kvpolicy, kvpolicy_kernels._checks;"
        "import transformers.models.llama.modeling_llama;"
        "from kvpolicy.hf import register_attention; register_attention();"
        + ("import kernels; assert hasattr(kernels, 'get_kernel'), kernels.__file__;" if hub else "")
        + "print('ok')"
    )
    out = _run(code, cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_kernels_import_is_light(tmp_path):
    out = _run("import sys, kvpolicy_kernels._checks; print('triton' in sys.modules, 'transformers' in sys.modules)",
               tmp_path)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_kvpolicy_import_does_not_load_transformers(tmp_path):
    out = _run("import sys, kvpolicy; kvpolicy.get_registry(); print('transformers' in sys.modules)", tmp_path)
    assert out.stdout.strip() == "False", out.stderr


def test_kernels_are_a_leaf():
    # kernels/ imports nothing from kvpolicy (the parts that run a kernel import it, never the other way round)
    import ast

    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] != "kvpolicy", f"{path.name} imports {name}"


def _extras() -> dict[str, list[str]]:
    """extra -> the requirements it adds, from the installed distribution's metadata."""
    import importlib.metadata
    import re

    out: dict[str, list[str]] = {}
    for req in importlib.metadata.requires("kvpolicy") or []:
        m = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", req)
        if m:
            out.setdefault(m.group(1), []).append(req.split(";")[0].strip())
    return out


def test_triton_comes_only_with_the_gpu_extra():
    extras = _extras()
    assert [r for r in extras["gpu"] if r.startswith("triton")]
    holders = sorted(e for e, reqs in extras.items() if any(r.startswith("triton") for r in reqs))
    assert holders == ["gpu"], holders
    all_extra = next(r for r in extras["all"] if r.startswith("kvpolicy["))
    assert "gpu" not in all_extra and "triton" not in all_extra, all_extra


def test_the_test_extra_brings_hugging_face_kernels():
    assert any(r.startswith("kernels") for r in _extras()["test"])
