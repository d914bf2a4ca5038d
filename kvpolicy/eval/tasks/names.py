"""Task and suite names, each task's scorer and generation length, and :func:`resolve_tasks`."""

from __future__ import annotations

from collections.abc import Sequence

from kvpolicy.errors import suggest

__all__ = ["DEPTH_TASKS", "MAX_NEW_TOKENS", "MODEL_TASKS", "SCORERS", "SUITES", "TASKS", "resolve_tasks"]

TASKS: tuple[str, ...] = (
    "passkey",
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_squad",
    "qa_hotpot",
)
# Measured against the full cache rather than scored against answers, with no generated sample (the runner runs them
# itself): "longgen", long-generation fidelity (kvpolicy.eval.longgen).
MODEL_TASKS: tuple[str, ...] = ("longgen",)
SUITES: dict[str, tuple[str, ...]] = {"ruler": TASKS[1:], "passkey": ("passkey",)}
DEPTH_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t == "passkey" or t.startswith("niah_"))
# "all": fraction of the expected answers found in the prediction; "part": 1.0 if any accepted answer is found.
# "file" is the task name of bring-your-own-data samples (kvpolicy.eval.taskfile).
SCORERS: dict[str, str] = {**{t: "part" if t.startswith("qa_") else "all" for t in TASKS}, "file": "part"}
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 16,
    "niah_single_1": 32,
    "niah_single_2": 32,
    "niah_single_3": 64,  # a UUID is ~36 tokens
    "niah_multikey_1": 32,
    "niah_multikey_2": 32,
    "niah_multikey_3": 64,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_squad": 32,
    "qa_hotpot": 32,
}


def resolve_tasks(spec: str) -> list[str]:
    """Expand a comma-separated list of task and suite names (``"ruler"``, ``"niah_single_1,vt"``).

    Order is kept and duplicates dropped; ``longgen`` (:data:`MODEL_TASKS`) may be listed too, though no suite
    includes it.  An unknown name raises ``ValueError`` naming it.
    """
    if not isinstance(spec, str):
        raise TypeError(f"task spec must be a str, not {type(spec).__name__}")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty task spec {spec!r}; give task or suite names, e.g. 'ruler' or 'niah_single_1,vt'")
    out: list[str] = []
    for name in names:
        if name in SUITES:
            expanded: Sequence[str] = SUITES[name]
        elif name in TASKS or name in MODEL_TASKS:
            expanded = (name,)
        else:
            known = (*SUITES, *TASKS, *MODEL_TASKS)
            raise ValueError(
                f"unknown task {name!r}.{suggest(name, known)} Known suites: {', '.join(SUITES)}; "
                f"tasks: {', '.join(TASKS + MODEL_TASKS)}"
            )
        out.extend(t for t in expanded if t not in out)
    return out
