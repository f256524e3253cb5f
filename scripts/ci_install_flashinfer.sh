#!/usr/bin/env bash
# Install the real FlashInfer on a CPU-only CI machine for tests/kernels/test_sm100_*.
#
# flashinfer-python's own requirements pull CUDA Python, the CUTLASS DSL, NCCL and
# cuDNN front ends (gigabytes) that a CPU never loads. The tests import its Python
# code only, so it goes in with --no-deps, followed by the pure-Python packages
# `import flashinfer` and its MoE modules need. Everything already installed
# (torch, numpy, ...) is held at its version by a constraints file, so this script
# never changes what the rest of the test suite runs on.
# Measured on the 2-core CPU machine (2026-12): 1 to 2.5 minutes, 555 MB on disk: the
# 62 MB wheel unpacks to 544 MB of CUDA sources and headers; apache-tvm-ffi is 13 MB,
# the rest is already there after .[dev].
#
# Usage: scripts/ci_install_flashinfer.sh [FLASHINFER_VERSION]   (default 0.7.2.post1,
# the version moe_backend.kernels.sm100 was checked against)
set -euo pipefail

FLASHINFER_VERSION="${1:-0.7.2.post1}"
PY="${PYTHON:-python}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Editable and direct-reference lines are not valid constraints.
"$PY" -m pip freeze --exclude-editable | grep -v -e ' @ ' > "$constraints" || true

"$PY" -m pip install -q --no-deps "flashinfer-python==${FLASHINFER_VERSION}"
# What `import flashinfer`, flashinfer.fused_moe and its JIT/cubin loaders import.
"$PY" -m pip install -q -c "$constraints" \
    "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py packaging requests tqdm numpy filelock
"$PY" -c "import flashinfer.fused_moe; assert flashinfer.__version__ == '${FLASHINFER_VERSION}', flashinfer.__version__"
