#!/usr/bin/env bash
# On the GPU host, in one call: time job's post-training stages at the 8B shape (bench/verify_time.py) and, with
# --bare, the bare tools' sequential commands on the same files first.
# Carried (made here, .gpu-bench/ in .git/info/exclude):
#   .gpu-bench/site.tgz          shared/gpu/make-offline-bundle.sh .gpu-bench pydantic==2.14.4 pydantic-core annotated-types typing-inspection
#   .gpu-bench/llama-tools.tgz   the llama.cpp tools as docker/build-llama-cpp.sh builds them for the image (portable
#                                x86-64, GGML_NATIVE=OFF): tar czf .gpu-bench/llama-tools.tgz -C ~/.cache/job llama.cpp-0.3.36
#   .gpu-bench/llama3-tokenizer.tgz  shared/gpu/make-llama3-tokenizer.py models/ggml-vocab-llama-bpe.gguf DIR, as a tarball
#                                of the folder llama3-tokenizer
# SITE=.gpu-lock/site.tgz takes the bundle of the CUDA image's versions (bench/gpu_bundle_from_lock.sh) instead.
# Usage: bash bench/verify_gpu.sh OUT_DIR [verify_time.py options, e.g. --bare --skip-gates-only]
set -euo pipefail
out=${1:?usage: verify_gpu.sh OUT_DIR [options]}; shift
mkdir -p /tmp/site "$out"
tar xzf "${SITE:-.gpu-bench/site.tgz}" -C /tmp/site
tar xzf .gpu-bench/llama3-tokenizer.tgz -C /tmp
tools=/tmp/llama-tools/llama.cpp-0.3.36
mkdir -p /tmp/llama-tools && tar xzf .gpu-bench/llama-tools.tgz -C /tmp/llama-tools
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; command -v nvcc || echo "no nvcc"; ls -d /usr/local/cuda* 2>/dev/null || true; python -m pip list 2>/dev/null | grep -i -e nvidia -e "^torch " || true; } >"$out/machine.txt"
export PYTHONPATH="/tmp/site:$PWD:$tools/gguf-py" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python bench/verify_time.py --tokenizer /tmp/llama3-tokenizer --llama-cpp "$tools" --work /tmp/verify-bench \
  --out "$out/verify.jsonl" "$@" 2>&1 | grep -v -e '^Loading weights' -e 'Writing model shards' | tee "$out/run.log"
