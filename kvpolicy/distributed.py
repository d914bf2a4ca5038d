"""Tensor parallelism under torchrun: which rank this is, the checks before any work, output from rank 0.

kvpolicy runs on PyTorch's and transformers' own machinery: ``torchrun`` starts one process per GPU,
``torch.distributed`` connects them (NCCL on GPUs, gloo on CPUs) and transformers' tensor-parallel plan
(``DistributedConfig(tp_plan="auto")``) shards attention by heads. Each rank's attention then sees ``Hkv / world``
KV heads, so the ``KVPolicyCache`` built on that rank holds the pages, window, index and working set of its own
heads only. Selection is per KV head, so decoding adds no communication beyond the model's own all-reduces; the
collectives here run once per cache (the checks) and once per result (memory and stats).

* ``World`` / ``world()``: rank and size, from the process group or torchrun's environment.
* ``init_tensor_parallel(tp)``: joins torchrun's process group (the CLI's ``--tp``).
* ``check_heads``, ``check_shardable``, ``check_tensor_parallel``: the checks before any work; the last runs them
  on every rank and agrees on the outcome, so every rank raises the same ``RankError`` naming the ranks at fault.
* ``sum_over_ranks``: per-rank numbers and their sums.
* ``main_rank_output``, ``rank_local_path``: only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kvpolicy.policy import Policy

__all__ = [
    "RankError",
    "World",
    "check_heads",
    "check_shardable",
    "check_tensor_parallel",
    "init_tensor_parallel",
    "main_rank_first",
    "main_rank_output",
    "rank_local_path",
    "shutdown",
    "sum_over_ranks",
    "tp_size",
    "world",
]


class RankError(ValueError):
    """A check failed alike on every rank (the message names the ranks at fault where they differ): only rank 0
    needs to print it."""


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes (``size`` 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def tag(self) -> str:
        """``" (rank 1 of 2)"`` when there are several processes, else ``""``: for messages of one rank."""
        return f" (rank {self.rank} of {self.size})" if self.size > 1 else ""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """The process group's rank and size once it is initialised, else what torchrun put in the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def init_tensor_parallel(tp: int | None) -> World:
    """Join torchrun's process group for ``tp``-way tensor parallelism (``None``: as many ranks as torchrun
    started). Pure tensor parallelism only: ``tp`` must equal the number of processes. Backend NCCL when CUDA is
    available (each rank on GPU ``LOCAL_RANK``), gloo otherwise. Without torchrun and ``tp`` in (None, 1) this is a
    single process and nothing is initialised."""
    w = world()
    if tp is not None and tp < 1:
        raise RankError(f"--tp must be at least 1, got {tp}")
    if w.size == 1:
        if tp not in (None, 1):
            raise RankError(
                f"--tp {tp} needs {tp} processes, one per GPU: launch with "
                f"`torchrun --nproc-per-node {tp} -m kvpolicy ...`"
            )
        return w
    if tp not in (None, w.size):
        raise RankError(
            f"--tp {tp}, but torchrun started {w.size} processes: kvpolicy runs pure tensor parallelism, so --tp "
            f"must equal --nproc-per-node (or leave --tp out)"
        )
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", w.local_rank))
        else:
            dist.init_process_group("gloo")
    return world()


def shutdown() -> None:
    """Leave the process group if this process joined one (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def tp_size(model: Any) -> int:
    """How many ranks ``model``'s weights are sharded over by transformers' tensor-parallel plan (1 if none; a
    config has none)."""
    return int(getattr(model, "tp_size", None) or 1) if hasattr(model, "parameters") else 1


# ------------------------------------------------------------------------------------------------ checks


def check_heads(config: Any, size: int) -> None:
    """Each rank must hold whole KV heads (with their GQA groups of query heads): ``Hkv`` divisible by ``size``."""
    if size <= 1:
        return
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hq = text.num_attention_heads
    hkv = getattr(text, "num_key_value_heads", None) or hq
    if hkv % size:
        fits = [n for n in range(1, hkv + 1) if hkv % n == 0]
        raise ValueError(
            f"the model has {hkv} KV heads, which do not split over {size} ranks: tensor parallelism gives each "
            f"rank whole KV heads with their query heads ({hkv} KV / {hq} query heads here); use --tp "
            f"{' or '.join(map(str, fits))}"
        )


def check_shardable(policy: Policy) -> None:
    """Every part of ``policy`` must be ``shardable`` (``kvpolicy.interfaces.Part``): its decisions for a KV head
    may depend only on that head, because the other heads live on other ranks."""
    parts = policy.make_parts()
    for part in (parts.index, parts.selector, parts.allocator, parts.transfer):
        if not part.shardable:
            raise ValueError(
                f"policy {policy.label()!r} cannot run tensor-parallel: its {part.kind} {part.name!r} "
                f"({type(part).__name__}) is not shardable (what it decides for one KV head depends on the other "
                f"heads, which live on other ranks); run it in one process"
            )


def _agreed_config(policy: Policy) -> dict[str, Any]:
    cfg = policy.to_config()
    budget = policy.resolve_budget()
    cfg["resolved_budget"] = budget.describe()
    return cfg


def check_tensor_parallel(model: Any, policy: Policy) -> None:
    """The checks before any work on a tensor-parallel model (nothing for one that is not): whole KV heads per
    rank, shardable parts, and the same policy and budget on every rank. Run on every rank at the same point (it
    is a collective); every rank raises the same ``RankError`` if any rank fails."""
    size = tp_size(model)
    if size <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() != size:
        got = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(f"the model is sharded over {size} ranks, but the process group has {got}: kvpolicy runs "
                         "pure tensor parallelism (one torchrun process per shard)")
    error = None
    try:
        check_heads(model.config, size)
        check_shardable(policy)
    except ValueError as e:
        error = str(e)
    mine = (error, _agreed_config(policy))
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine)
    failed = [(r, e) for r, (e, _) in enumerate(everyone) if e is not None]
    if failed:
        raise RankError(_by_rank(failed, size))
    ref = everyone[0][1]
    differ = [(r, cfg) for r, (_, cfg) in enumerate(everyone) if cfg != ref]
    if differ:
        r, cfg = differ[0]
        keys = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
        shown = ", ".join(f"{k}: rank 0 {ref.get(k)!r}, rank {r} {cfg.get(k)!r}" for k in keys)
        raise RankError(f"the ranks run different policies ({shown}): every rank must run the same policy and "
                        "budget on its share of the heads")


def _by_rank(failed: list[tuple[int, str]], size: int) -> str:
    messages = {e for _, e in failed}
    if len(failed) == size and len(messages) == 1:
        return f"on every rank: {failed[0][1]}"
    return "; ".join(f"rank {r}: {e}" for r, e in failed)


# ------------------------------------------------------------------------------------------------ reporting


def sum_over_ranks(values: Mapping[str, float], model: Any, *, once: tuple[str, ...] = ()) -> tuple[dict, list]:
    """``(sums, per_rank)`` of a dict of numbers over the ranks ``model`` is sharded over (a collective; a model
    that is not sharded gives ``(values, [values])``). Keys in ``once`` are the same on every rank and taken from
    rank 0 rather than summed."""
    if tp_size(model) <= 1:
        return dict(values), [dict(values)]
    import torch.distributed as dist

    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, dict(values))
    sums: dict[str, float] = {}
    for row in per_rank:
        for k, v in row.items():
            sums[k] = per_rank[0][k] if k in once else sums.get(k, 0) + v
    return sums, per_rank


@contextlib.contextmanager
def main_rank_output(w: World) -> Iterator[None]:
    """Only rank 0 prints: on the other ranks standard output goes nowhere, and warnings and transformers'
    progress bars are off (pass ``progress=w.is_main`` to kvpolicy's own). Standard error stays open for errors,
    which the caller tags with the rank."""
    if w.is_main:
        yield
        return
    import warnings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def main_rank_first(tp: int) -> Iterator[None]:
    """Rank 0 runs the block first while the other ranks wait, then they run it (e.g. filling a file cache that
    they then read). A no-op for ``tp`` 1 or without a process group. Not for blocks with collectives."""
    import torch.distributed as dist

    if tp <= 1 or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    if dist.get_rank() == 0:
        yield
        dist.barrier()
    else:
        dist.barrier()
        yield


@contextlib.contextmanager
def rank_local_path(path: str | os.PathLike[str], w: World) -> Iterator[str]:
    """Only rank 0 writes ``path``. Another rank gets a private copy of it as it was before anyone wrote (so a
    resumable run plans the same work on every rank), deleted afterwards. Every rank must enter together (a
    barrier follows the copy)."""
    path = os.fspath(path)
    if w.size <= 1:
        yield path
        return
    import torch.distributed as dist

    if w.is_main:
        dist.barrier()  # the other ranks have copied the file
        yield path
        return
    tmp = tempfile.mkdtemp(prefix=f"kvpolicy-rank{w.rank}-")
    local = os.path.join(tmp, os.path.basename(path) or "out")
    try:
        if os.path.isfile(path):
            shutil.copyfile(path, local)
        dist.barrier()
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
