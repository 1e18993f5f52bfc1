#!/usr/bin/env bash
# On the GPU host, in one call: build the pinned llama.cpp tools from the carried source (no network there), then
# time the tokenizer pre-flight, the export and the verify stage at the 8B shape (bench/verify_time.py).
# Carried (made here, .gpu-bench/ in .git/info/exclude):
#   .gpu-bench/site.tgz          shared/gpu/make-offline-bundle.sh .gpu-bench pydantic==2.14.4 pydantic-core annotated-types typing-inspection
#   .gpu-bench/llama-src.tgz     vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist, without models/, benches/ and the
#                                GPU backends other than CUDA
#   .gpu-bench/llama3-tokenizer  shared/gpu/make-llama3-tokenizer.py models/ggml-vocab-llama-bpe.gguf .gpu-bench/llama3-tokenizer
# Usage: bash bench/verify_gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: verify_gpu.sh OUT_DIR}
mkdir -p /tmp/site /tmp/lsrc "$out"
tar xzf .gpu-bench/site.tgz -C /tmp/site
tar xzf .gpu-bench/llama-src.tgz -C /tmp/lsrc
src=/tmp/lsrc/llama.cpp tools=/tmp/llama-tools
started=$(date +%s)
cmake -S "$src" -B /tmp/lbuild -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF >/dev/null
cmake --build /tmp/lbuild --target llama-quantize llama-completion llama-perplexity llama-tokenize -j "$(nproc)" \
  >"$out/build.log" 2>&1
mkdir -p "$tools/bin"
for tool in llama-quantize llama-completion llama-perplexity llama-tokenize; do cp "/tmp/lbuild/bin/$tool" "$tools/bin/"; done
cp "$src/convert_hf_to_gguf.py" "$tools/"; cp -r "$src/conversion" "$src/gguf-py" "$tools/"
echo 0c1e57098bba43ac29e6e3b677cdceebdd22334f >"$tools/COMMIT"
echo "{\"step\": \"build_llama_cpp\", \"seconds\": $(( $(date +%s) - started ))}" >>"$out/verify.jsonl"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; } >"$out/machine.txt"
export PYTHONPATH="/tmp/site:$PWD:$tools/gguf-py" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python bench/verify_time.py --tokenizer .gpu-bench/llama3-tokenizer --llama-cpp "$tools" --work /tmp/verify-bench \
  --out "$out/verify.jsonl" 2>&1 | grep -v -e '^Loading weights' -e 'Writing model shards' | tee "$out/run.log"
