#!/usr/bin/env bash
# Decode latency on the lent GPU: Llama-3.1-8B shape, random bf16 weights. Usage: run_gpu_bench_decode.sh LENGTHS POLICIES [TAG]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
tag=${3:-h200}
timeout 560 python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$2" --budget 256 --length "$1" \
  --steps 24 --breakdown-steps 6 --json "$OUT/bench_decode_llama8b_$tag.json" --plot "$OUT/bench_decode_llama8b_$tag.png" \
  2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -40
