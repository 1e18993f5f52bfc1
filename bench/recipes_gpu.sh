#!/usr/bin/env bash
# Recipes 1-3 of examples/ on the GPU for 20 steps each, on Llama-3.2-1B-shaped random weights with the smoke model's
# tokenizer (TOKENIZER_DIR), data from examples/data/, export off (training speed only). Appends each run's
# training section of the manifest to OUT.jsonl.   Usage: TOKENIZER_DIR=… bash bench/recipes_gpu.sh OUT.jsonl
set -uo pipefail
out=${1:?usage: recipes_gpu.sh OUT.jsonl}
models=${MODELS:-/tmp/bench-models}
[ -d "$models/1b" ] || python bench/train_throughput.py make-model --shape 1b --dir "$models/1b"
cp "${TOKENIZER_DIR:?}"/* "$models/1b/"
recipe() {
  spec=$1 data=$2
  timeout "${LIMIT:-150}" python -m job.cli run --spec "examples/$spec" --set "model.name=$models/1b" --set "data.source=examples/data/$data" \
    --set training.max_steps=20 --set export.merged=false --set 'export.gguf=[]' --set run.output=/tmp/recipe-runs \
    > "/tmp/$spec.log" 2>&1
  code=$?
  python - "$spec" "$code" "$out" <<'PY'
import json, sys
spec, code, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
events = []
for line in open(f"/tmp/{spec}.log"):
    try:
        events.append(json.loads(line))
    except ValueError:
        pass
row = {"recipe": spec, "exit": code}
for e in events:
    if e.get("event") == "train.started":
        row.update({k: e.get(k) for k in ("backend", "precision", "batch_size", "gradient_accumulation_steps", "rows")})
    if e.get("event") == "train.finished":
        row.update({k: e.get(k) for k in ("steps", "tokens_per_second", "peak_gpu_memory_gib", "seconds", "first_loss", "final_loss")})
with open(out, "a") as fh:
    fh.write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
  tail -3 "/tmp/$spec.log"
}
recipe alpaca-llama31-8b.yaml alpaca-en.jsonl
recipe finetome-llama31-8b-chatml.yaml finetome-sharegpt.jsonl
recipe llama32-3b-conversational.yaml llama32-conversations.jsonl
