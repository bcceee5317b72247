#!/usr/bin/env bash
# Prepare the wheels scripts/gpu_check.py installs offline on the GPU machine
# (`--wheelhouse .wheelhouse`, carried with the run): diffusers, for the steps that compare with
# it, and what it needs that the GPU image (Python 3.12, no network) lacks.
#
#   bash scripts/make_wheelhouse.sh [DIR]      # default DIR: .wheelhouse (git-ignored)
#
# diffusers' requirements against the image's packages: filelock, huggingface-hub (>=1.32; the
# image has 1.33), numpy, regex, requests, safetensors (>=0.8; the image has 0.8.0) and Pillow are
# there; importlib_metadata is not, and it needs zipp>=3.20 (the image's version is not known, so
# a zipp is carried; pip takes it only if the installed one is too old) and lazy-importer.
# DIFFUSERS_VERSION picks the diffusers (default: the one installed here, else the newest).
# All are pure-Python wheels, 6.2 MiB together with diffusers 0.42.1 (the device tool carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.wheelhouse}"
PYTHON="${PYTHON:-python3}"
if [ -z "${DIFFUSERS_VERSION:-}" ]; then
  DIFFUSERS_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || true)
fi
DIFFUSERS="diffusers${DIFFUSERS_VERSION:+==$DIFFUSERS_VERSION}"

rm -rf "$DIR"
mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d "$DIR" \
  "$DIFFUSERS" importlib_metadata lazy-importer zipp
# What gpu_check.py installs: pip resolves the rest against the image first, then this folder.
echo "$DIFFUSERS" > "$DIR/requirements.txt"

echo "wheels in $DIR ($(du -sh "$DIR" | cut -f1)); their requirements (check them against the image's list):"
for wheel in "$DIR"/*.whl; do
  requires=$(unzip -p "$wheel" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
    | tr '\n' ';' || true)
  echo "  $(basename "$wheel"): ${requires:-none}"
done
