#!/usr/bin/env bash
# job's own training path against the bare loops on the same GPU, in one call: 1B then 8B shape (random weights),
# 4-bit base, batch 2 x 2048, unsloth's gradient checkpointing, 12 measured-window steps. Each row also profiles 3
# extra steps (GPU busy fraction, the host's costliest calls) into PROFILE. VARIANTS lists job trainer variants
# (bench/train_throughput.py --variant) to compare against job's default in the same call; IMPLS the bare loops
# (default: bare unsloth and transformers+peft+bitsandbytes; IMPLS=unsloth for bare unsloth only).
# Usage (GPU host, stack on PYTHONPATH):  bash bench/hot_loop_rows.sh OUT.jsonl PROFILE.txt
set -uo pipefail
out=${1:?usage: hot_loop_rows.sh OUT.jsonl PROFILE.txt} profile=${2:?}
models=${MODELS:-/tmp/bench-models} shapes=${SHAPES:-1b 8b} impls=${IMPLS:-unsloth hf} variants=${VARIANTS:-default}
for shape in $shapes; do
  [ -d "$models/$shape" ] || python bench/train_throughput.py make-model --shape "$shape" --dir "$models/$shape"
  row() { echo "== $shape $*" >> "$profile"
          timeout "${LIMIT:-240}" python bench/train_throughput.py run --model-dir "$models/$shape" --shape "$shape" --seq 2048 \
            --batch "${BATCH:-2}" --steps 12 --warmup 3 --profile "$profile" --out "$out" "$@" \
            || echo "{\"failed\": \"$shape $*\", \"exit\": $?}" >> "$out"; }
  for impl in $impls; do row --impl "$impl"; done
  for variant in $variants; do row --impl job --variant "$variant"; done
done
