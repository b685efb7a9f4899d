#!/usr/bin/env bash
# The README's test command: full set-up on a fresh machine, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser test drives Debian's chromium + chromedriver (no browser
# download is possible here); installed only when missing and apt is usable.
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "setup: could not install chromium; the dashboard browser test will be skipped" >&2
fi
exec python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest --durations=15 "$@"
