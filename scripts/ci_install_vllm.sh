#!/usr/bin/env bash
# Install the real vLLM on a CPU-only CI machine for tests/integrations/vllm.
#
# vLLM's own requirements pin CUDA torch, flashinfer and friends (gigabytes);
# the tests only import its Python code with VLLM_TARGET_DEVICE=cpu. So vLLM
# goes in with --no-deps, followed by the pure-Python packages those imports
# need. Everything already installed (torch, triton, numpy from .[dev]) is
# held at its version by a constraints file, so this script never changes
# what the rest of the test suite runs on. pip's cache is used as usual.
#
# Usage: scripts/ci_install_vllm.sh [VLLM_VERSION]   (default 0.33.0)
set -euo pipefail

VLLM_VERSION="${1:-0.33.0}"
PY="${PYTHON:-python}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Editable and direct-reference lines are not valid constraints. transformers is
# left free: .[dev] wants >=5, vLLM 0.33 requires >=5.16.1,<5.21, both hold below.
"$PY" -m pip freeze --exclude-editable | grep -v -e ' @ ' -e '^transformers==' > "$constraints" || true

"$PY" -m pip install -q --no-deps "vllm==${VLLM_VERSION}"
# What `vllm serve --help`, the configs, and a CPU FusedMoE layer import.
"$PY" -m pip install -q -c "$constraints" \
    "transformers>=5.16.1,<5.21" "pydantic>=2.12" "fastapi<0.137" "oss-harmony>=0.0.11" \
    "xgrammar==0.2.8" "llguidance>=1.7,<1.8" \
    psutil pyzmq msgspec cbor2 cachetools cloudpickle py-cpuinfo einops pybase64 orjson requests \
    aiohttp prometheus_client starlette uvicorn uvloop watchfiles openai partial_json_parser
