#!/usr/bin/env bash
# The precision rows of docs/benchmarks.md: 8B shape, seq 2048, batch 4, job's path vs bare unsloth at 16-bit and fp8,
# then fp8 with unsloth's gradient checkpointing through job's path. One GPU, random weights.
# Usage (on the GPU host, stack on PYTHONPATH): bash bench/precision_rows.sh OUT.jsonl
set -uo pipefail
out=${1:?usage: precision_rows.sh OUT.jsonl}
models=${MODELS:-/tmp/bench-models}
[ -d "$models/8b" ] || python bench/train_throughput.py make-model --shape 8b --dir "$models/8b"
run() { timeout "${LIMIT:-300}" python bench/train_throughput.py run --model-dir "$models/8b" --shape 8b --seq 2048 --steps 10 --out "$out" "$@" \
          || echo "{\"failed\": \"$*\", \"exit\": $?}" >> "$out"; }
for precision in 16bit fp8; do
  for impl in unsloth job; do run --impl $impl --precision $precision --batch 4 --checkpointing 0; done
done
run --impl job --precision fp8 --batch 4 --checkpointing 1
