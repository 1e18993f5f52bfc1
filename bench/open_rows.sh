#!/usr/bin/env bash
# The rows docs/benchmarks.md still lacks, for one GPU, in three device calls of under 10 minutes each.
#   PART=a: job vs bare unsloth in one process per row, each order (bare first, then job's trainer before and after
#           the session-3 setting), at 1B and 8B.
#   PART=b: the 4-bit and checkpointed points of the auto-vs-sweep comparison (8B), and transformers+peft at 8B.
#   PART=c: toward the 18,000 tokens/s stretch at 8B: fp8 base without checkpointing at batch 4, 8 and 12, the bare
#           loop (every batch) then job's trainer, on one loaded model (the H200's 139 GiB holds batch 12): also the
#           fp8 row of job vs bare at batch 4.
# Usage (GPU host, stack on PYTHONPATH): PART=a bash bench/open_rows.sh OUT.jsonl; PART=b TOKENIZER_DIR=… bash …
set -uo pipefail
out=${1:?usage: PART=a|b|c open_rows.sh OUT.jsonl}
models=${MODELS:-/tmp/bench-models}
for shape in 1b 8b; do
  [ -d "$models/$shape" ] || python bench/train_throughput.py make-model --shape "$shape" --dir "$models/$shape"
done
row() {  # SHAPE LIMIT ARGS...
  local shape=$1 limit=$2; shift 2
  timeout "$limit" python bench/train_throughput.py run --model-dir "$models/$shape" --shape "$shape" --seq 2048 \
    --steps 12 --warmup 3 --out "$out" "$@" || echo "{\"failed\": \"$shape $*\", \"exit\": $?}" >> "$out"
}
case "${PART:?set PART=a, b or c}" in
  a)
    for order in bare,default,inline bare,inline,default; do row 1b 120 --impl job --compare "$order"; done
    row 8b 150 --impl job --compare bare,inline,default ;;
  b)
    SWEEP="4bit:0:4,8 4bit:1:8,16" LIMIT=150 bash bench/auto_vs_sweep.sh "$out"
    row 8b 150 --impl hf ;;
  c)
    row 8b 480 --impl job --precision fp8 --checkpointing 0 --batch 4,8,12 --compare bare,default ;;
esac
