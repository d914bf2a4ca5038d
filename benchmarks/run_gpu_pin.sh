#!/usr/bin/env bash
# Time to second token with the two ways of page-locking the CPU pools (kvpolicy/host_memory.py), each in its own
# process (torch caches cudaHostAlloc blocks within one). Carry .whl; installs the wheels into /tmp/site for the
# later calls. Llama-3.1-8B shape, random bf16 weights, 256 tokens, flash SDPA, no dense baseline (the policy
# row's own prefill is the reference). TEST_SECONDS > 0 first runs every CUDA test (log in $OUT).
# Usage: run_gpu_pin.sh LENGTH POLICY SECONDS_EACH [TEST_SECONDS]
set -u
source "$(dirname "$0")/gpu_setup.sh"
if [ "${4:-0}" != 0 ]; then
  bash "$(dirname "$0")/gpu_tests.sh" "$4" "$OUT/gpu_tests.log"
fi
for mode in alloc register; do
  KVPOLICY_PIN=$mode timeout "$3" python3 -m kvpolicy.cli bench decode --config llama3-8b --policy "$2" --budget 256 \
    --length "$1" --steps 8 --breakdown-steps 2 --sdpa-backend flash --no-dense --json "$OUT/pin_$mode.json" \
    2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -3
done
python3 - "$OUT" <<'PY'
import json, sys
for mode in ("alloc", "register"):
    try:
        r = json.load(open(f"{sys.argv[1]}/pin_{mode}.json"))["rows"][0]
    except (OSError, KeyError, IndexError, ValueError) as e:
        print(mode, "no row:", e); continue
    print(f"{mode:9s} prefill {r['ttft_s']:.2f} s  second token {r['ttst_s']:.2f} s  ratio {r['ttst_s'] / r['ttft_s']:.2f}"
          f"  tpot {r['tpot_ms']:.1f} ms  pool alloc {r.get('layers_pool_alloc_s', 0):.2f} s"
          f"  index {r.get('layers_build_index_s', 0):.2f} s  pool write {r.get('layers_build_pool_s', 0):.2f} s")
PY
