#!/usr/bin/env bash
# GPU eval on the lent machine: a GGUF assembled under /tmp from carried pieces (benchmarks/gpu_piece.sh), wheels
# already installed in /tmp/site. Environment: GGUF, SHA, NAME (model name in the rows), POLICIES, RESUME.
# Usage: run_gpu_eval.sh TASKS LENGTHS BUDGETS SAMPLES SECONDS [extra eval args]
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KVPOLICY_CACHE=/tmp/kvc TOKENIZERS_PARALLELISM=false
echo "$SHA  $GGUF" | sha256sum -c - || exit 3
# resume from committed rows (RESUME=benchmarks/results/....jsonl): finished cells are skipped
if [ -n "${RESUME:-}" ] && [ ! -f /tmp/res.jsonl ] && [ -f "$RESUME" ]; then cp "$RESUME" /tmp/res.jsonl; fi
POLICIES=${POLICIES:-full,oracle,icecache@cuda:uva,icecache-reuse@cuda:uva,quest:uva,pqcache,magicpig,arkvale,omnikv,snapkv,streaming}
timeout "$5" python3 -m kvpolicy.cli eval --model "$GGUF" --model-name "$NAME" --dtype bfloat16 \
  --policy "$POLICIES" --task "$1" --length "$2" --budget "$3" --samples "$4" --out /tmp/res.jsonl "${@:6}" \
  > /tmp/eval.log 2>&1
echo "eval rc=$?"
grep -v -E "Loading weights|Converting|FutureWarning|past_key_values|return forward_call" /tmp/eval.log | tail -8
cp /tmp/res.jsonl "$OUT/eval_${NAME}_h200.jsonl"
