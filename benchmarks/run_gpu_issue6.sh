#!/usr/bin/env bash
# Issue 6 on the lent GPU (carry .whl): CUDA tests of kernels and the decode path, kernel micro-benchmarks,
# decode latency vs dense (Llama-3.1-8B shape, random bf16 weights), a profile. Usage: run_gpu_issue6.sh LENGTHS [POLICIES]
set -u
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda -x tests/test_kernels.py tests/test_page_load.py \
  tests/test_cuda.py tests/test_conformance.py 2>&1 | grep -v -E "Warning|forward_call|^$" | tail -25 | tee "$OUT/gpu_tests_issue6.log"
timeout 90 python3 benchmarks/bench_kernels.py --json "$OUT/bench_kernels_h200.json" 2>&1 | tail -40
POL=${2:-icecache,icecache@cuda:uva,quest:uva,icecache-reuse@cuda:uva}
timeout 300 python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$POL" --budget 256 --length "$1" \
  --steps 24 --breakdown-steps 6 --json "$OUT/bench_decode_llama8b_h200.json" --plot "$OUT/bench_decode_llama8b_h200.png" \
  2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -30
timeout 60 python3 benchmarks/profile_decode.py --config llama3-8b --length 8192 --policy icecache@cuda:uva --steps 4 \
  --rows 30 2>&1 | grep -v -E "Warning|forward_call" | tail -75 > "$OUT/profile_icecache_8k.txt"
tail -3 "$OUT/profile_icecache_8k.txt"
