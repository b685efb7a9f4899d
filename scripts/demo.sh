#!/usr/bin/env bash
# The README's main job: full set-up, then a simulated federation on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m fedmoe.shared.cli simulate --preset default --out "runs/default-$(date +%Y%m%d-%H%M%S)" "$@"
