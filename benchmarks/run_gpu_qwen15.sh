#!/usr/bin/env bash
# Qwen2.5-1.5B (real weights) on the lent GPU, after benchmarks/gpu_piece.sh assembled /tmp/q/q15.gguf and
# run_gpu_issue6.sh installed the wheels: eval phases (resumable, one results file) and decode latency.
# Usage: run_gpu_qwen15.sh SECONDS_4K SECONDS_LONG
set -u
export GGUF=/tmp/q/q15.gguf NAME=qwen2.5-1.5b PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KVPOLICY_CACHE=/tmp/kvc
export SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
export RESUME=benchmarks/results/eval_qwen15_h200.jsonl
bash benchmarks/run_gpu_eval.sh ruler,passkey 4k 64,256 1 "$1"
bash benchmarks/run_gpu_eval.sh passkey,niah_single_2,niah_multikey_1,qa_squad 16k,32k 256 1 "$2"
timeout 120 python3 -m kvpolicy.cli bench decode --model "$GGUF" --policy icecache@cuda:uva,quest:uva --budget 256 \
  --length 8192,32000 --steps 16 --breakdown-steps 4 --sdpa-backend flash --json "$OUT/bench_decode_qwen15_h200.json" \
  2>&1 | grep -v -E "Warning|forward_call|bench decode:" | tail -12
python3 -m kvpolicy.cli report /tmp/res.jsonl --markdown "$OUT/eval_qwen15_h200.md" > /dev/null 2>&1; ls -la $OUT
