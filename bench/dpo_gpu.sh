#!/usr/bin/env bash
# On the GPU host, in one call: DPO at the 8B shape through job against a bare unsloth + trl DPO loop with the same
# settings (bench/dpo_throughput.py; the requirement is job >= 0.97x the bare loop). Random weights in the
# Llama-3.1-8B shape with the real Llama 3 tokenizer, preference rows of realistic lengths, then one process per
# variant, alternating: bare-1, job-1, bare-2, job-2, the second pair only while the time budget lasts.
# Carried (made here, .gpu-bench/ in .git/info/exclude):
#   .gpu-bench/site.tgz              shared/gpu/make-offline-bundle.sh .gpu-bench pydantic==2.14.4 pydantic-core annotated-types typing-inspection
#   .gpu-bench/llama3-tokenizer.tgz  shared/gpu/make-llama3-tokenizer.py models/ggml-vocab-llama-bpe.gguf DIR, as a tarball
#                                    of the folder llama3-tokenizer
# Settings (environment): PRECISION (4bit; 16bit with BACKEND=hf) BATCH (2 pairs) SEQ (2048) CHECKPOINTING (0) STEPS (15, WARMUP 5 of them)
# LIMIT (170 s a process) BUDGET (530 s from this script's start: a process after the first two starts only if the
# longest one so far, and 10 s more, would still end inside it) VARIANTS ("bare job bare job") ROWS (256)
# PROMPT_TOKENS (200,400) ANSWER_TOKENS (300,700). The budget counts the model's making too, so the call ends inside a
# 10-minute command: the first pair ends by about 1.5 minutes of unpacking and making the model plus 2 x LIMIT, and a
# later process starts only where it should end by BUDGET (bench/packed_gpu.sh gives its variants 450 s after the
# rows, on top of the model's making).
# Writes OUT/dpo.jsonl (one line a process, or its exit code and last log lines, or why it was skipped),
# OUT/<variant>-<n>.log, OUT/<variant>-<n>.trainer_args.json (the trainer's whole TrainingArguments),
# OUT/rows.stats.json, OUT/summary.json (job's median tokens/s over the bare loop's) and OUT/machine.txt.
# BACKEND=hf runs it on the CPU with transformers + peft: MODELS holds a tiny model as 8b-llama3 (made with
# dpo_throughput.py make-tiny when absent), rows are shorter, and the GPU bundle is not unpacked (SITE=none; its
# compiled packages are for the GPU host's Python). Usage: bash bench/dpo_gpu.sh OUT_DIR
set -uo pipefail
out=${1:?usage: dpo_gpu.sh OUT_DIR}
began=$(date +%s)
backend=${BACKEND:-unsloth}
mkdir -p "$out"
site=${SITE:-.gpu-bench/site.tgz} precision=${PRECISION:-4bit}
[ "$backend" = hf ] && site=${SITE:-none} precision=${PRECISION:-16bit}  # 4-bit (bitsandbytes) needs CUDA
if [ "$site" != none ]; then
  mkdir -p /tmp/site
  tar xzf "$site" -C /tmp/site || exit 3
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 UNSLOTH_DISABLE_STATISTICS=1 TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python -m pip list 2>/dev/null | grep -i -e flash -e xformers -e "^torch " -e triton || true; } >"$out/machine.txt" 2>&1

models=${MODELS:-/tmp/bench-models}
model=$models/8b-llama3
if [ "$backend" = hf ]; then
  [ -f "$model/config.json" ] || python bench/dpo_throughput.py make-tiny --dir "$model" >/dev/null 2>&1 || exit 1
  tokenizer=${TOKENIZER_DIR:-$model}
  prompt_tokens=${PROMPT_TOKENS:-20,50} answer_tokens=${ANSWER_TOKENS:-30,80}
else
  tar xzf .gpu-bench/llama3-tokenizer.tgz -C /tmp || exit 3
  tokenizer=${TOKENIZER_DIR:-/tmp/llama3-tokenizer}
  if [ ! -f "$model/config.json" ]; then
    python bench/train_throughput.py make-model --shape 8b --dir "$model" 2>&1 | grep -v -e '^Loading weights' -e 'Writing model shards' | tail -5
  fi
  prompt_tokens=${PROMPT_TOKENS:-200,400} answer_tokens=${ANSWER_TOKENS:-300,700}
fi
if [ "$(cd "$tokenizer" && pwd -P)" != "$(cd "$model" && pwd -P)" ]; then
  cp "$tokenizer"/* "$model/"  # over make-model's word-level tokenizer: the rows are real text
fi
rows=/tmp/dpo-rows.jsonl
python bench/dpo_throughput.py make-rows --out "$rows" --rows "${ROWS:-256}" --tokenizer "$tokenizer" \
  --prompt-tokens "$prompt_tokens" --answer-tokens "$answer_tokens" --seq "${SEQ:-2048}" >/dev/null || exit 1
cp "$rows.stats.json" "$out/rows.stats.json"
limit=${LIMIT:-170}
longest=0

variant() {  # variant KIND LABEL
  local kind=$1 label=$2 start code
  start=$(date +%s)
  rm -rf "/tmp/dpo-work-$label"  # an earlier call's files on a warm machine must not pass for this one's
  timeout -k 10 "$limit" python bench/dpo_throughput.py run --variant "$kind" --label "$label" --backend "$backend" \
    --model-dir "$model" --rows "$rows" --precision "$precision" --batch "${BATCH:-2}" --seq "${SEQ:-2048}" \
    --checkpointing "${CHECKPOINTING:-0}" --steps "${STEPS:-15}" --warmup "${WARMUP:-5}" --work "/tmp/dpo-work-$label" \
    --out "$out/dpo.jsonl" >"/tmp/dpo-$label.log" 2>&1
  code=$?
  grep -v -e '^Loading weights' -e 'Writing model shards' -e '%|' "/tmp/dpo-$label.log" | tail -n 400 >"$out/$label.log"
  cp "/tmp/dpo-work-$label/trainer_args.json" "$out/$label.trainer_args.json" 2>/dev/null
  if [ "$code" != 0 ]; then
    python - "$label" "$kind" "$code" "/tmp/dpo-$label.log" "$out/dpo.jsonl" <<'PY'
import json, sys
label, kind, code, log, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
tail = [line[:300] for line in open(log, errors="replace").read().splitlines()[-12:]]
row = {"variant": label, "kind": kind, "exit": code, "timed_out": code in (124, 137), "log_tail": tail}
open(out, "a").write(json.dumps(row) + "\n")
PY
  fi
  took=$(( $(date +%s) - start ))
  [ "$took" -gt "$longest" ] && longest=$took
  tail -n 1 "$out/dpo.jsonl" | cut -c 1-400
}

n=0
declare -A count
for kind in ${VARIANTS:-bare job bare job}; do
  count[$kind]=$(( ${count[$kind]:-0} + 1 ))
  label=$kind-${count[$kind]}
  n=$((n + 1))
  if [ "$n" -gt 2 ] && [ $(( $(date +%s) - began + longest + 10 )) -gt "${BUDGET:-530}" ]; then
    echo "{\"variant\": \"$label\", \"kind\": \"$kind\", \"skipped\": \"time budget\"}" >>"$out/dpo.jsonl"
    continue
  fi
  variant "$kind" "$label"
done
python bench/dpo_throughput.py summary --rows "$out/dpo.jsonl" | tee "$out/summary.json"
