#!/usr/bin/env bash
# On the GPU host: the CUDA image's package versions (docker/lock-cuda.txt, bundled by bench/gpu_bundle_from_lock.sh
# into .gpu-lock/site.tgz) checked against what Python imports there, then 20 training steps through job's trainer
# (unsloth, 4-bit, the Llama-3.2-1B shape, random weights) with them.
# Usage: bash bench/image_versions_gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: image_versions_gpu.sh OUT_DIR}
mkdir -p /tmp/site "$out"
tar xzf .gpu-lock/site.tgz -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python bench/lock_versions.py /tmp/site/LOCK.txt | tee "$out/lock-versions.json"
python -c 'import torch, unsloth, trl, peft, bitsandbytes, transformers, datasets, json; print(json.dumps({m.__name__: m.__version__ for m in (torch, unsloth, trl, peft, bitsandbytes, transformers, datasets)} | {"cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}))' \
  2>&1 | tail -1 | tee "$out/imported.json"
python bench/train_throughput.py make-model --shape 1b --dir /tmp/models/1b >/dev/null
python bench/train_throughput.py run --impl job --model-dir /tmp/models/1b --shape 1b --batch 2 --seq 2048 --steps 20 \
  --warmup 3 --out "$out/train.jsonl" 2>&1 | tail -3
