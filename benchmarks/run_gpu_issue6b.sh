#!/usr/bin/env bash
# Issue 6 on the lent GPU (carry .whl): where an eager decode step waits on the host (profile with sync debug
# mode, 32k), then decode latency vs dense at the given lengths. Usage:
#   run_gpu_issue6b.sh LENGTHS POLICIES PROFILE_POLICIES [PROFILE_SECONDS] [BENCH_SECONDS]
set -u
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
for p in ${3//,/ }; do
  timeout "${4:-100}" python3 benchmarks/profile_decode.py --config llama3-8b --length 32768 --policy "$p" --steps 4 \
    --rows 30 > "$OUT/profile_${p//[@:+]/_}_32k.txt" 2>&1
  grep -A 31 "synchronising calls" "$OUT/profile_${p//[@:+]/_}_32k.txt" | head -12
done
timeout "${5:-380}" python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$2" --budget 256 --length "$1" \
  --steps 16 --breakdown-steps 4 --sdpa-backend flash --json "$OUT/bench_decode_llama8b_h200.json" \
  --plot "$OUT/bench_decode_llama8b_h200.png" 2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -30
