#!/usr/bin/env bash
# Prepare, on a machine with internet, what the H200 device calls carry (git-ignored folders; a
# call carries at most 64 MiB, so each part fits one call):
#   .whl/cute/p1/chunk.aa, .whl/cute/p2/chunk.ab   the cp312 wheels of nvidia-cutlass-dsl 4.8.1 (with
#                                                  its CUDA 13 libraries) and quack-kernels 0.6.5, one
#                                                  tar split in two
#   .bundle/vllm-part{1,2,3}.tar                   vLLM 0.26 and what it imports (scripts/vllm_offline_bundle.py)
# On the device, `source scripts/device/env.sh` installs and unpacks whatever has arrived.
# Usage: bash scripts/device/pack.sh [--no-vllm]
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64)
pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${platforms[@]}" -d "$tmp" \
    nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi torch-c-dlpack-ext quack-kernels==0.6.5
mkdir -p .whl/cute/p1 .whl/cute/p2
(cd "$tmp" && tar cf - ./*.whl) | split -b 60M - "$tmp/chunk."
mv "$tmp/chunk.aa" .whl/cute/p1/ && mv "$tmp/chunk.ab" .whl/cute/p2/
test ! -e "$tmp/chunk.ac" || { echo "pack.sh: the wheels need a third chunk" >&2; exit 1; }
rm -rf "$tmp"
if [ "${1:-}" != "--no-vllm" ]; then
    python3 scripts/vllm_offline_bundle.py .bundle/vllm --prune-sm90 --vllm 0.26.0 --present scripts/h200_image_packages.txt
fi
ls -la .whl/cute/p1 .whl/cute/p2 .bundle 2>/dev/null
