#!/usr/bin/env bash
# mypy on the installed package moe_backend, weights/ and integrations/ included.
#
# The repository keeps weights/ and integrations/ at the top level; installed, they are
# moe_backend.weights and moe_backend.integrations ([tool.setuptools] package-dir). mypy cannot
# follow that mapping (nor an editable install's import hook), so this builds the installed
# layout out of symlinks under build/ and checks the package there; error paths read
# build/typecheck/moe_backend/<weights|integrations|...>/file.py. Settings: [tool.mypy].
#
# Usage: scripts/typecheck.sh [extra mypy arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/moe_backend"
ln -s "$PWD"/moe_backend/* "$PWD/weights" "$PWD/integrations" "$tree/moe_backend/"
MYPYPATH="$tree" "$PY" -m mypy -p moe_backend "$@"
