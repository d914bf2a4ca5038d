#!/usr/bin/env bash
# The eval grid of one model split over several processes sharing the lent GPU (the per-cell work is mostly
# Python and small kernels, so one process leaves the GPU idle). Run after run_gpu_pin.sh installed the wheels
# and benchmarks/gpu_piece.sh assembled the GGUF. Each worker takes a group of tasks (groups separated by ';'),
# finishes every length of LENGTHS in order, and appends rows to /tmp/ev/wN.jsonl (resumable); the run ends at
# an absolute deadline, and `collect` writes the rows and log tails to $OUT.
# Usage: run_gpu_eval_workers.sh start "TASKS;TASKS;..." LENGTHS BUDGETS DEADLINE_EPOCH_S
#        run_gpu_eval_workers.sh collect NAME [WAIT_UNTIL_EPOCH_S]
# Environment: GGUF, SHA, NAME (model name in the rows), DTYPE (bfloat16), POLICIES.
set -u
export PYTHONPATH=${PYTHONPATH-/tmp/site} PYTHONUNBUFFERED=1 KVPOLICY_CACHE=/tmp/kvc TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
# processes sharing one card: let each allocator return what it no longer uses (5 workers once held 74 of
# 80 GB at 8k and one ran out of memory)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p /tmp/ev
if [ "$1" = start ]; then
  echo "$SHA  $GGUF" | sha256sum -c - || exit 3
  # convert the GGUF to its safetensors cache once, before the workers would all do it at the same time
  python3 -c "import sys; from kvpolicy.models import load; load(sys.argv[1])" "$GGUF" 2>&1 | grep "kvpolicy\]"
  POLICIES=${POLICIES:-full,oracle,icecache@cuda:uva,icecache-reuse@cuda:uva,quest:uva,pqcache,magicpig,arkvale,omnikv,snapkv,streaming}
  IFS=';' read -ra groups <<< "$2"
  IFS=',' read -ra lengths <<< "$3"
  for i in "${!groups[@]}"; do
    cmd=""
    for L in "${lengths[@]}"; do
      cmd+="left=\$(( $5 - \$(date +%s) )); [ \$left -gt 30 ] || exit 0; timeout \$left python3 -m kvpolicy.cli eval"
      cmd+=" --model $GGUF --model-name $NAME --dtype ${DTYPE:-bfloat16} --policy $POLICIES --task ${groups[$i]}"
      cmd+=" --length $L --budget $4 --samples 1 --out /tmp/ev/w$i.jsonl; "
    done
    setsid nohup bash -c "$cmd" > "/tmp/ev/w$i.log" 2>&1 < /dev/null &
    echo "worker $i: ${groups[$i]}"
  done
  exit 0
fi
# collect: wait for the workers (or WAIT_UNTIL), then bring back one JSONL and the logs' last lines
until [ -z "$(pgrep -f 'kvpolicy.cli eval')" ] || [ "$(date +%s)" -ge "${3:-0}" ]; do sleep 5; done
pgrep -f 'kvpolicy.cli eval' > /dev/null && echo "workers still running at the wait limit"
cat /tmp/ev/w*.jsonl > "$OUT/eval_$2.jsonl" 2>/dev/null
for f in /tmp/ev/w*.log; do
  echo "== $f"; grep -v -E "Loading weights|Converting|FutureWarning|past_key_values|return forward_call" "$f" | tail -3
done > "$OUT/eval_$2.log"
wc -l /tmp/ev/w*.jsonl; tail -c 3000 "$OUT/eval_$2.log"
