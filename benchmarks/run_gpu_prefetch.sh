#!/usr/bin/env bash
# Prefetch (KVPolicyCache(prefetch=...), bench suffixes +prefetch/+estimate) on the lent GPU; carry .whl.
# Every CUDA test first (TEST_SECONDS > 0), then one decode bench per RUN: Llama-3.1-8B shape, random bf16
# weights, 256 tokens, flash SDPA, 32 timed steps and 4 breakdown steps, the dense baseline in the same run.
# Usage: run_gpu_prefetch.sh TEST_SECONDS RUN... with RUN = "LENGTH|SECONDS|POLICY,POLICY,..."
set -u
source "$(dirname "$0")/gpu_setup.sh"
if [ "$1" != 0 ]; then
  bash "$(dirname "$0")/gpu_tests.sh" "$1" "$OUT/gpu_tests.log"
fi
shift
for run in "$@"; do
  IFS='|' read -r len secs pols <<< "$run"
  timeout "$secs" python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$pols" --budget 256 --length "$len" \
    --steps 32 --breakdown-steps 4 --sdpa-backend flash --json "$OUT/bench_prefetch_$len.json" \
    --plot "$OUT/bench_prefetch_$len.png" 2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -12
done
