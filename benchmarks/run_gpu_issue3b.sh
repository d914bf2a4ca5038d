#!/usr/bin/env bash
# Second device call of issue 3: CUDA tests, index targets with CUDA-graph search, overlap and insertion stall.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_dci_tree.py tests/test_conformance.py \
  tests/test_icecache.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_dci_tree.py --device cuda --lengths 8192 32768 131072 --steps 10 --adds 8 \
  --json "$OUT/dci_tree_h100.jsonl" 2>&1 | tee "$OUT/dci_tree_h100.txt"
python3 benchmarks/bench_index_targets.py --device cuda --length 36864 --steps 20 --indexes exact,dci_tree \
  --json "$OUT/index_targets_h100.jsonl" 2>&1 | tee "$OUT/index_targets_h100.txt"
timeout 300 python3 benchmarks/bench_overlap.py --config llama3-8b --length 36864 --steps 48 \
  --json "$OUT/overlap_h100.jsonl" 2>&1 | grep -v Warning | tee "$OUT/overlap_h100.txt"
