#!/usr/bin/env bash
# Deferred insertion and TTST on the lent GPU (carry .whl). Usage:
#   run_gpu_defer.sh LENGTHS POLICIES TEST_SECONDS BENCH_SECONDS TAG
# TEST_SECONDS > 0 first runs the pinned-allocation probe and the CUDA tests of deferred insertion and captured
# decoding. The bench: Llama-3.1-8B shape, random bf16 weights, 256 tokens, flash SDPA, 32 timed steps (two
# insertion rounds), dense and captured dense baselines.
set -u
source "$(dirname "$0")/gpu_setup.sh"
if [ "$3" != 0 ]; then
  python3 benchmarks/probe_pinned_alloc.py "$OUT/probe_pinned_alloc.json"
  timeout "$3" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_prefill_job.py \
    -k "deferred or captured_model or background" 2>&1 | grep -E "passed|failed|^FAILED|^E " | head -20 | tee "$OUT/gpu_tests_$5.log"
fi
timeout "$4" python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$2" --budget 256 --length "$1" \
  --steps 32 --breakdown-steps 4 --sdpa-backend flash --dense-graphs --json "$OUT/bench_decode_$5.json" \
  --plot "$OUT/bench_decode_$5.png" 2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -4
