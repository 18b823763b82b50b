#!/usr/bin/env bash
# The CPU kernels (csrc/*/*_cpu.cpp) and the ops' C++ glue under AddressSanitizer: a CPU-only build
# of vitfast._C with VITFAST_SANITIZE=address in a copy of the tree, then the ops' CPU tests with
# libasan preloaded. An access past the end of a tensor or of a kernel's own buffers stops the
# test with ASan's report. (The CUDA kernels' memcheck without a GPU: scripts/emulator_memcheck.sh.)
#
#   bash scripts/cpu_memcheck.sh [BUILD_DIR] [PYTEST_ARGS ...]
#
# BUILD_DIR (default ../cpu_memcheck): where the copy builds (this tree's own build stays as it is).
# Default tests: the ops' files (their CPU cases: fresh random shapes against the references).
set -euo pipefail
cd "$(dirname "$0")/.."
HERE="$PWD"
BUILD="${1:-$HERE/../cpu_memcheck}"
shift || true
PY="${PYTHON:-$HERE/.venv/bin/python}"
LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
[ -e "$LIBASAN" ] || { echo "cpu_memcheck: no libasan.so from ${CXX:-g++}" >&2; exit 2; }
mkdir -p "$BUILD"
rm -rf "$BUILD/csrc" "$BUILD/tests"
tar -C "$HERE" -cf - --exclude='*.so' --exclude=__pycache__ csrc vitfast tests setup.py pyproject.toml | tar -C "$BUILD" -xf -
cd "$BUILD"
VITFAST_BUILD=cpu VITFAST_SANITIZE=address MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace \
  >"$BUILD/build.log" 2>&1 || { tail -30 "$BUILD/build.log"; exit 1; }
echo "cpu_memcheck: built $(ls vitfast/_C*.so) with AddressSanitizer"
[ $# -gt 0 ] || set -- tests/test_topk_softmax.py tests/test_soft_target_ce.py tests/test_dense_soft_target_ce.py \
  tests/test_covariance.py tests/test_window_attention.py tests/test_head_mix_attention.py tests/test_op_edges.py \
  tests/test_arguments.py tests/test_cpu_isa.py -m "not cuda" -k "not torch_compile"
# leaks: Python and torch keep allocations for the process's life; reports go to files (pytest
# captures the test's stderr, and a halted process would take it along)
rm -f "$BUILD"/asan.*
rc=0
# libstdc++ right after the runtime: ASan intercepts __cxa_throw, and finds the real one only if
# libstdc++ is loaded when it starts (the ops' argument checks throw)
LIBSTDCXX="$(${CXX:-g++} -print-file-name=libstdc++.so.6)"
LD_PRELOAD="$LIBASAN $LIBSTDCXX" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$BUILD/asan" PYTHONPATH="$BUILD" \
  "$PY" -m pytest -q -x -p no:cacheprovider "$@" || rc=$?
if ls "$BUILD"/asan.* >/dev/null 2>&1; then
  cat "$BUILD"/asan.*
  echo "cpu_memcheck: FAILED: AddressSanitizer reported the access above" >&2
  exit 1
fi
[ $rc = 0 ] && echo "cpu_memcheck: no out-of-bounds access in the tests run"
exit $rc
