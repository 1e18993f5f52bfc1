#!/usr/bin/env bash
# On the GPU host, in one call: where packed rows lose their speed (bench/packed_throughput.py). Random weights in the
# Llama-3.1-8B shape with the real Llama 3 tokenizer, FineTome-like ShareGPT rows, then one process per variant, one
# after another: bare-packed, bare-fixed, job-packed, then the EXTRA variants while the time budget lasts.
# Carried (made here, .gpu-bench/ in .git/info/exclude):
#   .gpu-bench/site.tgz              shared/gpu/make-offline-bundle.sh .gpu-bench pydantic==2.14.4 pydantic-core annotated-types typing-inspection
#   .gpu-bench/llama3-tokenizer.tgz  shared/gpu/make-llama3-tokenizer.py models/ggml-vocab-llama-bpe.gguf DIR, as a tarball
#                                    of the folder llama3-tokenizer
# SITE=.gpu-lock/site.tgz takes the bundle of the CUDA image's versions (bench/gpu_bundle_from_lock.sh) instead.
# Settings (environment): PRECISION (fp8) BATCH (4) SEQ (2048) CHECKPOINTING (0) STEPS (20, WARMUP 5 of them) LIMIT (150 s a variant; job-packed
# gets 20 s more for its data preparation and closing stages) BUDGET (450 s after the rows are made, for the extras)
# VARIANTS (the main ones, "bare-packed bare-fixed job-packed", each NAME or NAME:VAR=VALUE,...)
# EXTRA ("bare-fixed:UNSLOTH_BLOCK_COMPILE=0": NAME:VAR=VALUE,... runs NAME with those variables set; the default
# takes unsloth's per-block compile from fixed rows, as unsloth/models/_block_compile.py does for every packed batch,
# so the compile's share of the gap shows apart from attention's).
# Writes OUT/packed.jsonl (one line a variant, or its exit code and last log lines), OUT/<variant>.log,
# OUT/<variant>.profile.txt, OUT/rows.stats.json and OUT/machine.txt. BACKEND=hf with MODELS holding a tiny 8b-llama3
# (packed_throughput.py make-tiny) runs it on a CPU.   Usage: bash bench/packed_gpu.sh OUT_DIR
set -uo pipefail
out=${1:?usage: packed_gpu.sh OUT_DIR}
mkdir -p /tmp/site "$out"
tar xzf "${SITE:-.gpu-bench/site.tgz}" -C /tmp/site || exit 3
tar xzf .gpu-bench/llama3-tokenizer.tgz -C /tmp || exit 3
tokenizer=${TOKENIZER_DIR:-/tmp/llama3-tokenizer}
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1 \
  UNSLOTH_DISABLE_STATISTICS=1 TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python -m pip list 2>/dev/null | grep -i -e flash -e xformers -e "^torch " -e triton || true; } >"$out/machine.txt" 2>&1

models=${MODELS:-/tmp/bench-models}
model=$models/8b-llama3
if [ ! -f "$model/config.json" ]; then
  python bench/train_throughput.py make-model --shape 8b --dir "$model" 2>&1 | grep -v -e '^Loading weights' -e 'Writing model shards' | tail -5
fi
cp "$tokenizer"/* "$model/"  # over make-model's word-level tokenizer: the rows are real text
rows=/tmp/packed-rows.jsonl
python bench/packed_throughput.py make-rows --out "$rows" --rows "${ROWS:-3000}" --tokenizer "$tokenizer" || exit 1
cp "$rows.stats.json" "$out/rows.stats.json"
began=$(date +%s)

variant() {  # variant KIND [VAR=VALUE,...]
  kind=$1 env_list=${2:-}
  label=$kind${env_list:+:$env_list}
  name=$(echo "$label" | tr -c 'A-Za-z0-9_.\n-' '_')
  limit=${LIMIT:-150}
  [ "$kind" = job-packed ] && limit=$((limit + 20))
  # shellcheck disable=SC2086
  timeout -k 10 "$limit" env ${env_list//,/ } python bench/packed_throughput.py run --variant "$kind" --label "$label" \
    --model-dir "$model" --rows "$rows" --precision "${PRECISION:-fp8}" --batch "${BATCH:-4}" --seq "${SEQ:-2048}" \
    --checkpointing "${CHECKPOINTING:-0}" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" --backend "${BACKEND:-unsloth}" --work "/tmp/packed-work-$name" \
    --profile-table "$out/$name.profile.txt" --profile-deadline $((limit - 35)) --out "$out/packed.jsonl" \
    >"/tmp/$name.log" 2>&1
  code=$?
  grep -v -e '^Loading weights' -e 'Writing model shards' -e '%|' "/tmp/$name.log" | tail -n 400 >"$out/$name.log"
  if [ "$code" != 0 ]; then
    python - "$label" "$code" "/tmp/$name.log" "$out/packed.jsonl" <<'PY'
import json, sys
label, code, log, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tail = [line[:300] for line in open(log, errors="replace").read().splitlines()[-12:]]
row = {"variant": label, "exit": code, "timed_out": code in (124, 137), "log_tail": tail}
open(out, "a").write(json.dumps(row) + "\n")
PY
  fi
  tail -n 1 "$out/packed.jsonl" | cut -c 1-400
}

for kind in ${VARIANTS:-bare-packed bare-fixed job-packed}; do
  variant "${kind%%:*}" "$( [[ $kind == *:* ]] && echo "${kind#*:}")"
done
for extra in ${EXTRA-bare-fixed:UNSLOTH_BLOCK_COMPILE=0}; do
  if [ $(( $(date +%s) - began + ${LIMIT:-150} )) -gt "${BUDGET:-450}" ]; then
    echo "{\"variant\": \"$extra\", \"skipped\": \"time budget\"}" >>"$out/packed.jsonl"
    continue
  fi
  variant "${extra%%:*}" "$( [[ $extra == *:* ]] && echo "${extra#*:}")"
done
