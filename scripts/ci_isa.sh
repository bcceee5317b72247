#!/usr/bin/env bash
# The CPU engine on every ISA this machine can stand in for: the CPU-engine tests and
# `musefast doctor --selftest` run once per oneDNN cap (ONEDNN_MAX_CPU_ISA, read when a process
# first uses oneDNN, so each cap is a fresh process). AVX2 always (the cap stands in for an
# AVX2-only CPU); AVX512_CORE (AVX-512 without native bf16: bf16 emulated, auto -> fp32) where the
# CPU has AVX-512; the machine's own ISA is the uncapped run of the main test stage. A cap the CPU
# cannot reach is skipped and named. Ends with one line: the caps run, the caps skipped.
#
#   bash scripts/ci_isa.sh            (in the environment musefast is installed in)
#
# tests/test_cpu_isa.py caps its own child processes at AVX2, so it runs once, uncapped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
start=$(date +%s)

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }

ran=() skipped=()
caps=()
if has avx2; then caps+=(AVX2); else skipped+=("AVX2 (the CPU has no AVX2)"); fi
if has avx512f && has avx512bw && has avx512vl && has avx512dq; then caps+=(AVX512_CORE)
else skipped+=("AVX512_CORE (the CPU has no AVX-512)"); fi

tests=(tests/test_cpu_*.py tests/test_int8*.py)
capped_tests=()
for t in "${tests[@]}"; do [ "$t" = tests/test_cpu_isa.py ] || capped_tests+=("$t"); done

# From tests/, not the repository root: the root's kernels/ folder must not shadow an installed
# `kernels` package that diffusers imports (python -m puts the working folder on sys.path).
run_tests() { (cd tests && python -m pytest -q -p no:cacheprovider "${@/#tests\//}"); }

echo "== ci_isa: $(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs)"
echo "== tests/test_cpu_isa.py (its children capped at AVX2)"
t0=$(date +%s)
if has avx2; then run_tests tests/test_cpu_isa.py; ran+=("test_cpu_isa.py ($(( $(date +%s) - t0 ))s)")
else skipped+=("tests/test_cpu_isa.py (no AVX2)"); fi

for cap in "${caps[@]}"; do
  t0=$(date +%s)
  echo "== ONEDNN_MAX_CPU_ISA=$cap: doctor path line, doctor --selftest, CPU-engine tests"
  ONEDNN_MAX_CPU_ISA=$cap musefast doctor | grep -E '^(cpu path|cpu engine|int8 path)'
  ONEDNN_MAX_CPU_ISA=$cap musefast doctor --selftest
  ONEDNN_MAX_CPU_ISA=$cap run_tests "${capped_tests[@]}"
  ran+=("$cap ($(( $(date +%s) - t0 ))s)")
done

echo "== ci_isa done in $(( $(date +%s) - start ))s; ran under: ${ran[*]:-none}; uncapped: this CPU's own ISA" \
     "(main test stage); skipped: ${skipped[*]:-none}"
