#!/usr/bin/env bash
# Every CUDA test of the suite (pytest marker `cuda`), then the prefetch tests, on a machine with an NVIDIA GPU.
# Run from anywhere inside an installed checkout (pip install -e ".[all]"). Extra arguments go to the first pytest
# call (e.g. -k captured, -x). Prints the card and each pytest summary; the exit status is non-zero if any failed.
#   benchmarks/run_cuda_tests.sh [PYTEST_ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" || exit 2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
export KVPOLICY_STRICT_PLUGINS=1
python3 -m pytest -q -p no:cacheprovider -m cuda tests "$@"
rc=$?
python3 -m pytest -q -p no:cacheprovider tests/test_prefetch.py || rc=1
exit $rc
