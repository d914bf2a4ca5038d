"""benchmarks/split_file.py: a file split into pieces joins back to the same bytes, and a corrupt piece is refused."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "split_file.py"


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_split_and_join_round_trip(tmp_path):
    data = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes: three pieces of 0.4 MB
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    assert _run("split", src, tmp_path / "pieces", "--piece-mb", 0.4).returncode == 0
    pieces = sorted((tmp_path / "pieces").glob("model.gguf.part*"))
    assert [p.stat().st_size for p in pieces] == [400_000, 400_000, 224_004]
    manifest = tmp_path / "pieces" / "model.gguf.sha256"
    assert manifest.read_text() == f"{hashlib.sha256(data).hexdigest()}  model.gguf\n"
    out = tmp_path / "joined" / "model.gguf"
    assert _run("join", manifest, out).returncode == 0
    assert out.read_bytes() == data

    pieces[1].write_bytes(b"x" * 400_000)
    out.unlink()
    bad = _run("join", manifest, out)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr and not out.exists()
