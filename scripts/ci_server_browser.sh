#!/usr/bin/env bash
# CI step: the server's web page in headless Chromium (tests/test_server_browser.py).
#
# Debian's chromium from apt (the browser a Debian box has; Playwright's own browser download is
# not used: `playwright install` fetches from a CDN) and Playwright's Python package from PyPI,
# driving it through executable_path. Run it with musefast's CI environment active; it installs
# the serve extra next to it. Here the test must run: a skip (browser or package missing) fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q && apt-get install -y -q chromium
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q && sudo apt-get install -y -q chromium
  else
    echo "ci_server_browser.sh: chromium is not installed and this user cannot apt-get install it" >&2
    exit 2
  fi
fi
chromium --version 2>/dev/null || true
pip install -q -e ".[test,serve]" playwright
python scripts/print_versions.py "after the serve extra and playwright"
python -c "from importlib.metadata import version; print('playwright', version('playwright'))"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
python -m pytest tests/test_server_browser.py -q -rs -p no:cacheprovider | tee "$log"
if grep -q "SKIPPED" "$log"; then
  echo "ci_server_browser.sh: the browser test was skipped (see the reason above); it must run here" >&2
  exit 1
fi
