#!/usr/bin/env bash
# GPU eval on the lent machine (see docs): qwen2.5-0.5b GGUF assembled at /tmp/q/q.gguf from carried pieces,
# wheels installed in /tmp/site. Usage: run_gpu_eval.sh TASKS LENGTHS BUDGETS SAMPLES SECONDS [extra eval args]
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KVPOLICY_CACHE=/tmp/kvc TOKENIZERS_PARALLELISM=false
echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/q/q.gguf" | sha256sum -c - || exit 3
POLICIES=${POLICIES:-full,oracle,icecache,icecache-reuse,quest,pqcache,magicpig,arkvale,omnikv,snapkv,h2o,streaming}
timeout "$5" python3 -m kvpolicy.cli eval --model /tmp/q/q.gguf --model-name qwen2.5-0.5b --dtype bfloat16 \
  --policy "$POLICIES" --task "$1" --length "$2" --budget "$3" --samples "$4" --out /tmp/res.jsonl "${@:6}" \
  > /tmp/eval.log 2>&1
echo "eval rc=$?"
grep -v -E "Loading weights|Converting|FutureWarning|past_key_values|return forward_call" /tmp/eval.log | tail -60
cp /tmp/res.jsonl "$OUT/eval_qwen05_h200.jsonl"
python3 -m kvpolicy.cli report /tmp/res.jsonl --markdown "$OUT/eval_qwen05_h200.md" --plots "$OUT/plots" > /dev/null
