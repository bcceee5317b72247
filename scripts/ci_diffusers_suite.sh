#!/usr/bin/env bash
# diffusers' own aMUSEd fast tests (vendored in tests/peer_suites/diffusers_amused/, diffusers
# commit 15d50f1), offline: first against diffusers' classes (the baseline), then with only the
# pipeline import swapped to musefast's. Prints both pass/fail/skip counts; fails when musefast's
# classes fail anything but the DDUF round trips (which diffusers' own classes fail too).
# Needs the peers extra (diffusers, transformers) in the active environment; installs the
# suite's own test dependencies from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q requests-mock parameterized accelerate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

set +e
python tests/peer_suites/run_diffusers_amused.py --target diffusers > "${TMPDIR:-/tmp}/diffusers-amused-baseline.log" 2>&1
baseline_rc=$?
set -e
echo "== baseline (diffusers' classes): log in ${TMPDIR:-/tmp}/diffusers-amused-baseline.log"
tail -n 4 "${TMPDIR:-/tmp}/diffusers-amused-baseline.log"
[ "$baseline_rc" -eq 0 ] || echo "(the baseline's failures are diffusers' own; they do not fail CI)"

echo "== musefast's classes"
python tests/peer_suites/run_diffusers_amused.py --target musefast
