#!/usr/bin/env bash
# memcheck without a GPU: every CUDA kernel's own source run on the CPU emulator
# (tests/cuda_emulation/run_cases.py) with the binding built under AddressSanitizer. Any access
# past the end of a global buffer (a tensor's storage), of a block's dynamic shared memory (the
# emulator allocates exactly the launch's bytes) or of a static __shared__ array (a function-local
# static here: ASan's global redzones) stops the run with ASan's report -- what compute-sanitizer's
# memcheck finds on a GPU, on the emulated schedule. Not seen: an access that lands inside another
# live allocation, reads of uninitialised shared memory (initcheck), timing-dependent races.
#
#   bash scripts/emulator_memcheck.sh [CASE ...]     # default: every case of run_cases.py
#
# The binding builds once into build/cuda_emulation_asan; on the 2-core machine the build took
# ~8 min and all 84 cases ~8 min (benchmarks/NOTES.md). Needs gcc's libasan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
[ -e "$LIBASAN" ] || { echo "emulator_memcheck: no libasan.so from ${CXX:-g++}" >&2; exit 2; }
export VITFAST_EMU_ASAN=1
# build without the runtime preloaded (the compilers would run under it); the import that ends the
# build then fails on purpose ("ASan runtime does not come first"), the run below loads it
$PY - <<'EOF' >/dev/null 2>&1 || true
import os, sys
sys.path[:0] = [os.path.join("tests"), os.path.join("tests", "cuda_emulation")]
import run_cases
run_cases.build()
EOF
# leaks: Python and torch keep allocations for the process's life; halt at the first error
# (each case's line on stderr as it ends; the results' JSON, checked by the tests, is not needed)
rc=0
# (libstdc++ right after the runtime, so that ASan's __cxa_throw interceptor finds the real one)
LD_PRELOAD="$LIBASAN $(${CXX:-g++} -print-file-name=libstdc++.so.6)" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" \
  $PY tests/cuda_emulation/run_cases.py "$@" >/dev/null || rc=$?
if [ $rc = 0 ]; then
  echo "emulator_memcheck: no out-of-bounds access in ${*:-every case}"
else
  echo "emulator_memcheck: FAILED (exit $rc): an ASan report above names the kernel and the access; else the error above"
fi
exit $rc
