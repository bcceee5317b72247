#!/usr/bin/env bash
# CI step: parity tests against lucidrains' muse-maskgit-pytorch in their own environment.
# The peer is a test extra only. Its install_requires pull torchvision (which would bring a
# second torch) and its T5 text-encoding code wants transformers<5, so it gets its own venv: the CPU
# torch from local disk first, the peer without its dependencies, then the few it needs at
# import (torchvision is stubbed by the tests), then musefast itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TMPDIR:-/tmp}/musefast-ci-peer-lucidrains"
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q --no-deps "muse-maskgit-pytorch==0.3.5"
"$PY" -m pip install -q einops beartype vector-quantize-pytorch memory-efficient-attention-pytorch \
    ema-pytorch accelerate "transformers<5" tqdm pillow sentencepiece pytest
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" scripts/print_versions.py "lucidrains environment (pinned)"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MUSEFAST_CACHE="${MUSEFAST_CACHE:-$VENV/musefast-cache}"
echo "== parity with muse-maskgit-pytorch"
"$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/test_compat_lucidrains.py
