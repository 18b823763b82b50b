#!/usr/bin/env bash
# Compiles every C++ source of vitfast (glue, registration, CPU kernels; the .cu kernels are
# torch-free) against another torch's headers, without building or installing that torch: catches
# API differences before a GPU run on a machine with that torch (the device machine has 2.11.0).
#   pip download torch==2.11.0 --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/t
#   unzip -q /tmp/t/torch-*.whl 'torch/include/*' -d /tmp/t/x
#   bash scripts/check_torch_headers.sh /tmp/t/x/torch/include
set -euo pipefail
cd "$(dirname "$0")/.."
INC="${1:?usage: check_torch_headers.sh TORCH_INCLUDE_DIR}"
PY="${PYTHON:-.venv/bin/python}"
CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
NV_INC="$($PY -c 'import nvidia, os; print(next(os.path.join(p, "cu13", "include") for p in nvidia.__path__))' 2>/dev/null || true)"
PYINC="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
mkdir -p build/generated
[ -f build/generated/vitfast_build_config.h ] || { echo "run the build once first (build/generated)"; exit 2; }
fail=0
for f in $(find csrc -name '*.cpp' | sort); do
  if ! g++ -std=c++17 -fsyntax-only -w -DVITFAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc -Ibuild/generated \
      -isystem "$INC" -isystem "$INC/torch/csrc/api/include" -isystem "$PYINC" -isystem "$CUDA_INC" \
      ${NV_INC:+-idirafter "$NV_INC"} "$f" 2>"/tmp/check_headers.$$.log"; then
    echo "FAIL $f"; head -20 "/tmp/check_headers.$$.log"; fail=1
  fi
done
[ $fail = 0 ] && echo "all $(find csrc -name '*.cpp' | wc -l) C++ sources compile against $INC"
exit $fail
