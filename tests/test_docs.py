"""The README's and the docs' Python examples run as written, and the CLI page documents real subcommands.

A ```python block runs as it stands, with the blocks before it on the same page (a page reads top to bottom).
A block whose first line is a comment naming a ``.py`` file (``# my_selector/__init__.py``) is that file's text:
it is written under a temporary folder on ``sys.path`` (a later block naming the same file adds to it) and
imported by the blocks that use it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.cli import build_parser
from kvpolicy.registry import get_registry

ROOT = Path(__file__).resolve().parents[1]
FILE_HEADER = re.compile(r"#\s*([\w/.-]+\.py)\b")
PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if "```python" in p.read_text())
MODEL_PAGES = {"baselines.md", "indexes.md", "quickstart.md"}  # load SmolLM2 and generate


def _python_blocks(md: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", md, flags=re.S | re.M)


def _section_code(md: str, heading: str) -> str:
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return "\n".join(_python_blocks(section))


def _split_files(blocks: list[str], folder: Path) -> list[str]:
    """Write the file blocks under ``folder``; return the other blocks, in order."""
    code = []
    for block in blocks:
        m = FILE_HEADER.match(block)
        if m is None:
            code.append(block)
            continue
        path = folder / m.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(block + "\n")
    return code


def run_page(name: str, folder: Path) -> dict:
    """Run the Python examples of ``docs/NAME`` in one namespace; the file blocks go to ``folder``."""
    blocks = _python_blocks((ROOT / "docs" / name).read_text())
    code = _split_files(blocks, folder)
    module = types.ModuleType(f"docs_{Path(name).stem}")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    sys.path.insert(0, str(folder))
    before = set(sys.modules)
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"docs/{name} (python block {i + 1})", "exec"), module.__dict__)
        return module.__dict__
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module.__name__, None)
        for m in set(sys.modules) - before:  # the page's own packages (my_selector, ...)
            if getattr(sys.modules[m], "__file__", None) and str(folder) in sys.modules[m].__file__:
                del sys.modules[m]


def test_every_page_with_python_examples_is_listed():
    assert PAGES, "no ```python blocks found in docs/"
    assert MODEL_PAGES <= set(PAGES)


@pytest.mark.parametrize("page", [p for p in PAGES if p not in MODEL_PAGES])
def test_docs_python_examples_run(page, tmp_path):
    run_page(page, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(MODEL_PAGES))
def test_docs_python_examples_with_a_model_run(page, tmp_path):
    ns = run_page(page, tmp_path)
    res = ns.get("res")
    if res is not None:  # a page that generates keeps its result in `res`
        assert res.new_tokens > 0 and "budget" in res.summary()


def test_plugin_page_selector_passes_its_conformance_suite(tmp_path):
    """The plugin page's package and test class, run by pytest as a plugin author would run them."""
    ns = run_page("plugins.md", tmp_path)
    assert "TestRecentAndTop" in ns
    test_file = tmp_path / "test_recent_and_top.py"
    test_file.write_text("\n".join(b for b in _python_blocks((ROOT / "docs" / "plugins.md").read_text())
                                   if "SelectorConformance" in b))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 4, out.stdout[-3000:]  # the suite's four selector tests


def test_plugin_page_registers_its_selector_and_preset(tmp_path):
    run_page("plugins.md", tmp_path)  # writes my_selector/__init__.py
    sys.path.insert(0, str(tmp_path))
    try:
        import my_selector

        reg = get_registry()
        reg.register(my_selector, name="docs-my-selector")
        try:
            pol = kvpolicy.Policy.preset("recent-and-top", budget=128)
            assert pol.selector.name == "recent_and_top" and pol.dense_layers == (0, 1)
        finally:
            reg.unregister("docs-my-selector")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_selector", None)


@pytest.mark.slow
def test_readme_quick_start_example_runs():
    code = _section_code((ROOT / "README.md").read_text(), "Quick start")
    ns: dict = {}
    exec(compile(code, "README.md (quick start)", "exec"), ns)
    assert ns["res"].new_tokens > 0


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


def _cited(paths: list[Path]) -> set[str]:
    """Every backticked token of the given markdown files, with shell braces expanded (`a_{x,y}.json`)."""

    def expand(tok: str) -> list[str]:
        m = re.search(r"\{([^{}]*)\}", tok)
        if not m:
            return [tok]
        return [x for alt in m.group(1).split(",") for x in expand(tok[: m.start()] + alt + tok[m.end() :])]

    return {x for p in paths for tok in re.findall(r"`([^`\s]+)`", p.read_text()) for x in expand(tok)}


def test_committed_results_are_cited_and_listed():
    import fnmatch

    results = ROOT / "benchmarks" / "results"
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert files
    docs = _cited([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    # the README and docs cite a result by its path, from the repository root, from results/ or from its folder
    uncited = [f for f in files if not {f, f"benchmarks/results/{f}", f.split("/", 1)[1]} & docs]
    assert not uncited, f"results no page cites (delete them, or cite them): {uncited}"
    topics = {f.split("/")[0] for f in files}
    cited = {t.removeprefix("benchmarks/results/") for t in docs if t.startswith("benchmarks/results/")
             or (t.split("/")[0] in topics and not t.endswith(".py"))}
    missing = sorted(t for t in cited if "." in t.rsplit("/", 1)[-1] and not (results / t).is_file())
    assert not missing, f"cited results that do not exist: {missing}"
    listed = _cited([ROOT / "benchmarks" / "README.md"])
    unlisted = [f for f in files if not any(fnmatch.fnmatch(f.split("/", 1)[1], t) for t in listed)]
    assert not unlisted, f"results benchmarks/README.md does not list: {unlisted}"
    assert not [f for f in files if re.search(r"issue|[0-9a-f]{7}", f)], "issue numbers or hashes in result names"


def test_readme_demo_table_shows_what_the_default_demo_runs():
    from kvpolicy.eval.demo import DEFAULT_POLICIES

    section = (ROOT / "README.md").read_text().split("## Demo results", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[2:]  # rows[1] is the | --- | line
    assert [int(c.split()[0]) for c in header[1:]] == build_parser().parse_args(["demo"]).budget
    assert [r[0].split()[0] for r in body] == list(DEFAULT_POLICIES)
