#!/usr/bin/env bash
# `auto` against a sweep, on one GPU: `job run` with model.precision, training.batch_size and
# training.gradient_checkpointing all `auto` (8B shape, random weights, seq 2048, rows longer than the sequence),
# then the bare unsloth loop over the configurations auto chooses between (SWEEP: one process per precision and
# checkpointing, several batch sizes each). Auto is within target when its tokens/s is within 3% of the sweep's best.
# Usage (GPU host, stack on PYTHONPATH): TOKENIZER_DIR=<the smoke model's tokenizer> bash bench/auto_vs_sweep.sh OUT.jsonl
set -uo pipefail
out=${1:?usage: auto_vs_sweep.sh OUT.jsonl}
models=${MODELS:-/tmp/bench-models}
[ -d "$models/8b" ] || python bench/train_throughput.py make-model --shape 8b --dir "$models/8b"
MODEL=$models/8b PRECISION=auto NPROC=1 STEPS=${STEPS:-20} LIMIT=${AUTO_LIMIT:-540} bash bench/scaling_rows.sh "$out"
# precision:checkpointing:batches
for point in ${SWEEP:-16bit:0:4,8,12 4bit:0:4,8 4bit:1:8,16}; do
  IFS=: read -r precision ckpt batches <<< "$point"
  timeout "${LIMIT:-240}" python bench/train_throughput.py run --impl unsloth --model-dir "$models/8b" --shape 8b --seq 2048 \
    --precision "$precision" --checkpointing "$ckpt" --batch "$batches" --steps 10 --warmup 3 --out "$out" \
    || echo "{\"failed\": \"$point\", \"exit\": $?}" >> "$out"
done
