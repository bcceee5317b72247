#!/usr/bin/env bash
# CI step: the Triton kernel tests under the oldest supported Triton (pyproject: triton>=3.6, the
# GPU machine's image), so that an API 3.6 lacks fails here and not on the GPU.
#
# A small second environment layered on the active one (CI's main venv): its own site-packages
# hold only triton==3.6.0 and numpy<2.4 and come first on sys.path; torch, pytest and musefast
# (editable) come from the active environment through a .pth file, so nothing large is
# downloaded and nothing is compiled. numpy<2.4: Triton 3.6's interpreter turns one-element
# arrays into ints with int(), which numpy 2.4 refuses (Triton 3.8 fixed it); the compiled path
# has no such limit.
#
# The tests run under TRITON_INTERPRET=1 on CPU; the ones that compile kernels for sm_80/sm_90
# (no GPU needed) run the real Triton 3.6 code generator in a subprocess.
set -euo pipefail
cd "$(dirname "$0")/.."

TRITON_FLOOR="${TRITON_FLOOR:-3.6.0}"
BASE_PY="$(command -v python)"
if ! BASE_SITE=$("$BASE_PY" -c 'import sysconfig, torch, pytest, musefast; print(sysconfig.get_paths()["purelib"])' \
    2>/dev/null); then
  echo "ci_triton_floor.sh: run it with musefast's test environment active (torch, pytest, musefast installed)" >&2
  exit 2
fi

VENV="${TMPDIR:-/tmp}/musefast-ci-triton-floor"
rm -rf "$VENV"
"$BASE_PY" -m venv --without-pip "$VENV"
PY="$VENV/bin/python"
FLOOR_SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$BASE_PY" -m pip install -q --no-deps --target "$FLOOR_SITE" "triton==$TRITON_FLOOR" "numpy<2.4"
# addsitedir (not a plain path line) also runs the base's .pth files: musefast's editable finder
echo "import site; site.addsitedir('$BASE_SITE')" > "$FLOOR_SITE/zz-base-environment.pth"

"$PY" scripts/print_versions.py "Triton floor environment"
"$PY" -c "import triton; assert triton.__version__ == '$TRITON_FLOOR', triton.__file__"

export TRITON_INTERPRET=1 MUSEFAST_NO_EXT=1  # the C++ kernels are not under test here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# every test file that mentions triton; -k triton keeps its Triton cases (a file named *triton* runs whole)
mapfile -t files < <(grep -l triton tests/test_*.py)
echo "== Triton $TRITON_FLOOR: ${files[*]} -k triton"
"$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -k triton "${files[@]}"
