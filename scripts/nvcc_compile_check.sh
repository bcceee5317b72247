#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, so the CUDA
# kernels cannot rot on machines without a GPU. The .cu files are pure CUDA (no torch
# headers); they are compiled with the macros torch's extension build passes to nvcc, so a
# file that relies on implicit half/bfloat16 conversions fails here as it would there.
# Exits 0 with a message when nvcc is absent; non-zero on any compile error.
set -u
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "nvcc_compile_check: nvcc not found, skipped (set NVCC or CUDA_HOME to enable)"
  exit 0
fi

shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "nvcc_compile_check: no csrc/cuda/*.cu files"
  exit 0
fi

archs=(80 90)
torch_macros=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
              --expt-relaxed-constexpr)
failed=()
for f in "${files[@]}"; do
  for a in "${archs[@]}"; do
    if ! "$NVCC" -c -std=c++17 -O3 --use_fast_math -arch="sm_$a" "${torch_macros[@]}" \
         -DMUSEFAST_WITH_CUDA -Icsrc "$f" -o /dev/null; then
      failed+=("$f@sm_$a")
    fi
  done
done

total=$(( ${#files[@]} * ${#archs[@]} ))
if [ ${#failed[@]} -ne 0 ]; then
  echo "nvcc_compile_check: FAILED ${#failed[@]}/$total compiles: ${failed[*]}"
  exit 1
fi
arch_list=$(printf 'sm_%s ' "${archs[@]}")
echo "nvcc_compile_check: OK, ${#files[@]} file(s) x ${#archs[@]} archs (${arch_list% }) compiled with $("$NVCC" --version | grep -o 'release [0-9.]*')"
