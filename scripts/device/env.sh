# Sourced at the start of every H200 device call (`source scripts/device/env.sh`): installs this
# checkout under /tmp/mb, again whenever the package's sources differ from those installed (a warm
# machine keeps /tmp/mb between calls while the working tree may have changed: the twenty-fifth
# session's tests once ran an earlier call's code), unpacks whatever parts of scripts/device/pack.sh
# the call carried (a warm machine keeps what earlier calls unpacked), and sets PYTHONPATH. Run the
# package with `python -P` so that the checkout itself is not imported instead.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
sources=$(find moe_backend weights integrations pyproject.toml -type f -not -path '*/__pycache__/*' | sort | xargs cat | sha1sum | cut -d' ' -f1)
if [ "$(cat /tmp/mb/.done 2>/dev/null)" != "$sources" ]; then
    rm -rf /tmp/mb
    python -m pip install -q --no-deps --no-build-isolation --target /tmp/mb . >"$OUT/install.log" 2>&1 \
        && echo "$sources" >/tmp/mb/.done
fi
for part in .bundle/vllm-part*.tar; do
    [ -f "$part" ] || continue
    stamp=/tmp/site/.$(basename "$part").done
    [ -f "$stamp" ] || {
        mkdir -p /tmp/site
        python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='fully_trusted')" \
            "$part" /tmp/site && touch "$stamp"
    }
done
# CuTe DSL: install once both chunks have arrived, under a folder named site-packages (QuACK
# fingerprints code outside site-packages and fails on CuTe DSL's ContextVar, docs/cute_dsl.md).
if ls .whl/cute/p*/chunk.* >/dev/null 2>&1; then mkdir -p /tmp/cutechunks && cp .whl/cute/p*/chunk.* /tmp/cutechunks/; fi
if [ ! -f /tmp/cs/.done ] && [ -f /tmp/cutechunks/chunk.aa ] && [ -f /tmp/cutechunks/chunk.ab ]; then
    mkdir -p /tmp/cutewhl && cat /tmp/cutechunks/chunk.* | tar -C /tmp/cutewhl -x
    python -m pip install -q --no-deps --target /tmp/cs/site-packages /tmp/cutewhl/*.whl >"$OUT/cute_install.log" 2>&1 \
        && touch /tmp/cs/.done
fi
export PYTHONPATH=/tmp/mb:/tmp/site:/tmp/cs/site-packages:/tmp/cs/site-packages/nvidia_cutlass_dsl/dsl_packages
export VLLM_USE_DEEP_GEMM=0 VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$OUT/gpu.txt" 2>&1 || true
