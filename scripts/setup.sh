#!/usr/bin/env bash
# Installs fedmoe and its dependencies (torch first, pinned, so pip takes the CPU/CUDA
# build already chosen rather than pulling a newer one), then builds the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test]"
$PY -m fedmoe.shared.cli model pretrain --preset tiny
