"""The results file of ``kvpolicy eval``: one writer at a time (an advisory ``fcntl`` lock held for the whole
run), error rows of the cells about to be tried again removed first, so reruns replace them."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

__all__ = ["ResultsLockedError", "check_results_path", "open_results", "unique_rows"]

KEY = ("model", "task", "length", "sample", "policy", "budget_tokens", "seed")


class ResultsLockedError(BlockingIOError):
    """Another process is writing the same results file."""


def check_results_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path``; a directory or a special file (``/dev/full``) is refused."""
    p = Path(path)
    if p.exists() and not p.is_file():
        what = "a directory" if p.is_dir() else "a special file"
        raise ValueError(f"results path {str(p)!r} must be a regular file, not {what}")
    return p


def _locked(p: Path) -> IO[str]:
    f = open(p, "a+", encoding="utf-8")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ResultsLockedError(f"results file {str(p)!r} is being written by another kvpolicy eval; wait for "
                                     "it to finish or give another --out") from None
    return f


def _dropped(line: str, drop: Callable[[dict[str, Any]], bool]) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # a torn line is kept (readers skip it)
    return isinstance(row, dict) and drop(row)


@contextlib.contextmanager
def open_results(path: str | os.PathLike[str], drop: Callable[[dict[str, Any]], bool]) -> Iterator[IO[str]]:
    """``path`` open for appending under an exclusive lock; rows for which ``drop(row)`` holds are removed first
    (an atomic rewrite) and a torn last line from a killed run is ended, so new rows start clean."""
    p = check_results_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    f = _locked(p)
    try:
        f.seek(0)
        lines = f.read().splitlines(keepends=True)
        kept = [ln for ln in lines if not _dropped(ln, drop)]
        if len(kept) != len(lines):
            if kept and not kept[-1].endswith("\n"):
                kept[-1] += "\n"
            tmp = p.with_name(p.name + ".rewrite")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, p)
            f.close()
            f = _locked(p)  # the lock was on the replaced file
        elif lines and not lines[-1].endswith("\n"):
            f.write("\n")
        yield f
    finally:
        f.close()


def unique_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """One row per cell key (model, task, length, sample, policy, budget, seed), the last one kept, in order;
    rows without a key are kept. Returns the rows and how many duplicates were dropped (two writers that ran
    at once before the lock, or files given twice)."""
    last: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        if all(k in r for k in KEY):
            last[tuple(json.dumps(r[k]) for k in KEY)] = i
    keyed = set(last.values())
    kept = [r for i, r in enumerate(rows) if i in keyed or not all(k in r for k in KEY)]
    return kept, len(rows) - len(kept)
