#!/usr/bin/env bash
# Issue 6 on the lent GPU (carry .whl): CUDA tests of kernels and the decode path, then decode latency vs dense
# (Llama-3.1-8B shape, random bf16 weights, flash SDPA for every dense attention; also the captured dense
# baseline, --dense-graphs). Usage:
#   run_gpu_issue6.sh LENGTHS [POLICIES] [TEST_SECONDS] [BENCH_SECONDS]
set -u
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ "${3:-200}" != 0 ]; then
  timeout "${3:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_page_load.py tests/test_bookkeeping_kernels.py \
    tests/test_cuda.py tests/test_conformance.py tests/test_dci_tree.py 2>&1 | grep -v -E "Warning|forward_call|^$" | tail -40 \
    | tee "$OUT/gpu_tests_issue6.log" | tail -12
fi
POL=${2:-icecache@cuda:uva+graphs,icecache-hostkeys@cuda:uva+graphs,icecache-reuse@cuda:uva+graphs,quest:uva+graphs}
timeout "${4:-330}" python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$POL" --budget 256 --length "$1" \
  --steps 16 --breakdown-steps 4 --sdpa-backend flash --dense-graphs --json "$OUT/bench_decode_llama8b_h200.json" \
  --plot "$OUT/bench_decode_llama8b_h200.png" 2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -30
