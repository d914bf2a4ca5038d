#!/usr/bin/env bash
# Write one carried piece of a split file at its offset (idempotent). Usage: gpu_piece.sh PIECE DEST PIECE_BYTES
# (a piece named *NN is written at NN * PIECE_BYTES; `split -b PIECE_BYTES -d -a 2` made it)
set -eu
n=$((10#${1: -2}))
mkdir -p "$(dirname "$2")"
dd if="$1" of="$2" bs="$3" seek="$n" conv=notrunc status=none
ls -l "$2"
