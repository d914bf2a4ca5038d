#!/usr/bin/env bash
# Every CUDA test (and the prefetch tests), with a time limit; the tail of the log goes to LOG.
# Run after gpu_setup.sh. Usage: gpu_tests.sh SECONDS LOG
timeout "$1" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_kernels.py tests/test_page_load.py \
  tests/test_bookkeeping_kernels.py tests/test_dci_tree.py tests/test_prefill_job.py 2>&1 | grep -v -E "Warning|warnings.warn" \
  | tail -40 > "$2"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_prefetch.py 2>&1 | grep -E "passed|failed|^FAILED|^E " >> "$2"
grep -E "passed|failed|^FAILED|^ERROR" "$2" | tail -12
