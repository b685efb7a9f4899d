#!/usr/bin/env bash
# The README's test command: full set-up on a fresh machine, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest "$@"
