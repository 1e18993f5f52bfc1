#!/usr/bin/env bash
# Build the pinned llama.cpp tools once into DEST: the converter (convert_hf_to_gguf.py + gguf-py),
# llama-quantize, llama-completion, llama-perplexity (its KL-divergence mode gates the GGUFs), llama-tokenize
# (the tokenizer pre-flight), and the LoRA converter (convert_lora_to_gguf.py) with llama-export-lora, which merge an
# adapter into a base model's cached GGUF. The source is the llama.cpp vendored by the llama-cpp-python
# sdist on PyPI, so a machine that reaches only a package registry gets the same pinned tree.
# Usage: build-llama-cpp.sh DEST [extra cmake args...]
# Always a portable build (GGML_NATIVE=OFF: AVX2, no AVX-512 or AMX): the native build of this commit segfaults in
# llama-completion on an AVX-512/AMX Xeon for every GGUF (q8_0 and q4_k_m alike), and a tree built natively on one
# machine and reused on another (a cache, the image's prebuilt tree) may not run at all. BUILD records the flags, so
# a tree built with other flags is built again.
set -euo pipefail
version=0.3.36   # vendors llama.cpp at commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f
commit=0c1e57098bba43ac29e6e3b677cdceebdd22334f
dest=${1:?usage: build-llama-cpp.sh DEST [cmake args...]}; shift
flags="-DGGML_NATIVE=OFF $*"
if [ -x "$dest/bin/llama-quantize" ] && [ -x "$dest/bin/llama-completion" ] && [ -x "$dest/bin/llama-perplexity" ] \
   && [ -x "$dest/bin/llama-tokenize" ] && [ -x "$dest/bin/llama-export-lora" ] && [ -f "$dest/convert_lora_to_gguf.py" ] \
   && [ -f "$dest/COMMIT" ] && [ -d "$dest/conversion" ] \
   && [ "$(cat "$dest/BUILD" 2>/dev/null)" = "$flags" ]; then
  echo "llama.cpp tools already built in $dest"; exit 0
fi
for tool in cmake c++ make; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is required to build llama.cpp (apt-get install cmake g++ make)" >&2; exit 1; }
done
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" 2>&1 | grep -v 'is ignored' || true
tar xzf "$work"/llama_cpp_python-$version.tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF "$@" >/dev/null
# compiler warnings are many and harmless: keep them in a log and show its tail only on failure
cmake --build "$work/build" --target llama-quantize llama-completion llama-perplexity llama-tokenize llama-export-lora -j "$(nproc)" >"$work/build.log" 2>&1 \
  || { tail -50 "$work/build.log" >&2; exit 1; }
rm -rf "$dest.partial"; mkdir -p "$dest.partial/bin"
for tool in llama-quantize llama-completion llama-perplexity llama-tokenize llama-export-lora; do cp "$work/build/bin/$tool" "$dest.partial/bin/"; done
cp "$src/convert_hf_to_gguf.py" "$src/convert_lora_to_gguf.py" "$dest.partial/"
cp -r "$src/conversion" "$dest.partial/conversion"
cp -r "$src/gguf-py" "$dest.partial/gguf-py"
cp "$src/LICENSE" "$dest.partial/LICENSE"
echo "$commit" > "$dest.partial/COMMIT"
echo "$flags" > "$dest.partial/BUILD"
rm -rf "$dest"; mv "$dest.partial" "$dest"
echo "llama.cpp $commit built into $dest"
