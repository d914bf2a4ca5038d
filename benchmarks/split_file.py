"""Split a large file (a GGUF model, say) into pieces and join them again, checked by sha256.

For moving a file through a channel with a size limit per transfer, e.g. to a GPU machine without network access:

    python benchmarks/split_file.py split model.gguf pieces/ --piece-mb 64
    # pieces/model.gguf.part000, .part001, ... and pieces/model.gguf.sha256 (the `sha256sum` line of the whole)
    python benchmarks/split_file.py join pieces/model.gguf.sha256 model-copy/model.gguf

``join`` concatenates the pieces listed next to the manifest in order and checks the sha256 while it writes
(``kvpolicy.model_files.assemble_chunks``): the output appears, complete and verified, or not at all; an output
of the right size that is already there is kept. The manifest is a ``sha256sum`` line, so
``sha256sum -c model.gguf.sha256`` checks a file assembled by other means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpolicy.model_files import assemble_chunks, sha256_file


def split(path: Path, out_dir: Path, piece_bytes: int) -> Path:
    """Write ``path`` as pieces ``NAME.partNNN`` of ``piece_bytes`` (the last one shorter) and the manifest
    ``NAME.sha256`` into ``out_dir``; returns the manifest."""
    if piece_bytes < 1:
        raise ValueError(f"piece size must be at least 1 byte, got {piece_bytes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{path.name}.part*"):
        old.unlink()  # pieces of an earlier split would otherwise join this one
    n = 0
    with open(path, "rb") as src:
        while piece := src.read(piece_bytes):
            (out_dir / f"{path.name}.part{n:03d}").write_bytes(piece)
            n += 1
    manifest = out_dir / f"{path.name}.sha256"
    manifest.write_text(f"{sha256_file(path)}  {path.name}\n")
    print(f"{path} -> {n} pieces of at most {piece_bytes} bytes in {out_dir}; manifest {manifest}")
    return manifest


def join(manifest: Path, out: Path) -> Path:
    """Concatenate the pieces next to ``manifest`` into ``out``, verifying the manifest's sha256."""
    digest, name = manifest.read_text().split()
    pieces = sorted(manifest.parent.glob(f"{name}.part*"))
    if not pieces:
        raise FileNotFoundError(f"no pieces {name}.part* next to {manifest}")
    assemble_chunks(pieces, out, digest)
    print(f"{len(pieces)} pieces -> {out} (sha256 {digest} verified)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="file -> pieces and a sha256 manifest")
    s.add_argument("file", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--piece-mb", type=float, default=64.0, help="piece size in MB (10**6 bytes); default 64")
    j = sub.add_parser("join", help="manifest -> the verified whole file")
    j.add_argument("manifest", type=Path)
    j.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            split(args.file, args.out_dir, int(args.piece_mb * 10**6))
        else:
            join(args.manifest, args.out)
    except (OSError, ValueError) as e:
        print(f"split_file: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
