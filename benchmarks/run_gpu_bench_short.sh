#!/usr/bin/env bash
# Short decode benchmark on the lent GPU (flash SDPA for every dense attention). Usage: run_gpu_bench_short.sh LENGTHS POLICIES STEPS
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
timeout 200 python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$2" --budget 256 --length "$1" \
  --steps "$3" --breakdown-steps 4 --sdpa-backend flash --json "$OUT/bench_decode_llama8b_h200_flash.json" \
  --plot "$OUT/bench_decode_llama8b_h200_flash.png" 2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -14
