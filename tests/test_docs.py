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
