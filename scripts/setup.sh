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
# `fedmoe data make-suite --source wordnet|foldoc` reads Debian's WordNet and FOLDOC;
# installed only when missing and apt is usable (as scripts/test.sh does for chromium).
if { [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/dictd/foldoc.dict.dz ]; } && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base dict-foldoc >/dev/null; } \
    || echo "setup: could not install wordnet-base dict-foldoc; the real-definition suites will be skipped" >&2
fi
$PY -m fedmoe.shared.cli model pretrain --preset tiny
