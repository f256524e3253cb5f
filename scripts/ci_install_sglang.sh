#!/usr/bin/env bash
# Install the real SGLang on a CPU-only CI machine for tests/integrations/sglang.
#
# SGLang's requirements pin CUDA torch 2.14, flashinfer, sglang-kernel, DeepGEMM
# and friends (gigabytes); the tests only import its Python code. So SGLang goes
# in with --no-deps, followed by the pure-Python packages its MoE layer, server
# arguments and model runner import. Everything already installed (torch 2.13
# CPU, triton, numpy, transformers from .[dev] and the vLLM script) is held at its
# version by a constraints file, so this script never changes what the rest of
# the test suite runs on.
#
# torchvision (imported by sglang.srt.configs) is a CUDA build on PyPI: next to a
# CPU-only torch it fails at import, and installed into the environment it would
# break every other package that probes for it (transformers). On a CPU-only torch
# it therefore goes into its own folder, which only the SGLang tests put on their
# path (tests/integrations/sglang/conftest.py; its sitecustomize lets it import).
#
# Usage: scripts/ci_install_sglang.sh [SGLANG_VERSION]   (default 0.5.23)
set -euo pipefail

SGLANG_VERSION="${1:-0.5.23}"
PY="${PYTHON:-python}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Editable and direct-reference lines are not valid constraints.
"$PY" -m pip freeze --exclude-editable | grep -v -e ' @ ' > "$constraints" || true

"$PY" -m pip install -q --no-deps "sglang==${SGLANG_VERSION}"
# What `launch_server --help`, the plugin's start-up symbol check and a CPU FusedMoE layer import.
"$PY" -m pip install -q -c "$constraints" \
    "pydantic>=2.12" fastapi uvicorn uvloop orjson pybase64 psutil pyzmq msgspec requests aiohttp \
    einops pillow dill sentencepiece gguf "compressed-tensors>=0.18"

torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" = True ]; then
    extras="$("$PY" -c 'import sys; print(sys.prefix)')/share/moe_backend/sglang-cpu"
    rm -rf "$extras"
    "$PY" -m pip install -q --no-deps --target "$extras" "torchvision==$("$PY" - "$torch_version" <<'PYEOF'
import sys
major, minor = (int(p) for p in sys.argv[1].split(".")[:2])
print(f"0.{minor + 15}.*")  # torchvision 0.28 pairs with torch 2.13, and so on
PYEOF
)"
else
    "$PY" -m pip install -q -c "$constraints" torchvision
fi
