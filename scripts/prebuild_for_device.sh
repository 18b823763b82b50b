#!/usr/bin/env bash
# Builds vitfast._C here for the GPU machine (Python 3.12, torch 2.11.0+cu130, sm_90) and packs it
# into gpu_prebuilt/ (scripts/prebuilt.py), so that scripts/gpu_check.sh skips its build step when
# it is carried: run(..., carry=["gpu_wheels", "gpu_prebuilt"]). ~10 min on the 2-core machine the first time;
# run it whenever csrc/ or setup.py changed since the last pack (the check refuses a stale one).
#
#   bash scripts/prebuild_for_device.sh [VENV_DIR] [BUILD_DIR]
#
# VENV_DIR (default ../dev312): a venv of a Python 3.12 (pyenv's, else python3.12 on PATH) with the
# torch 2.11.0 wheel and its CUDA 13 wheels (their headers: cusparse.h and cuBLAS), made if missing.
# BUILD_DIR (default ../prebuild312): a copy of this tree (csrc/, setup.py, vitfast/) where it builds,
# so that this tree's own build (Python 3.11, torch 2.14.1) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE="$PWD"
VENV="${1:-$HERE/../dev312}"
BUILD="${2:-$HERE/../prebuild312}"
TORCH_SPEC="${DEVICE_TORCH:-torch==2.11.0}"
export TORCH_CUDA_ARCH_LIST="${DEVICE_ARCHS:-9.0}"
if [ ! -x "$VENV/bin/python" ]; then
  PY312="$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python"
  [ -x "$PY312" ] || PY312="$(command -v python3.12)"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" pybind11 ninja numpy setuptools
fi
"$VENV/bin/python" -c 'import torch, sys; print("prebuild:", sys.version.split()[0], torch.__version__)'
mkdir -p "$BUILD"
# the sources the build reads (scripts/prebuilt.py digests setup.py and csrc/); vitfast/ for the
# in-place output; build/ of the copy keeps ninja's objects, so a rerun recompiles what changed
# (copies keep their times: ninja sees unchanged sources as older than their objects)
rm -rf "$BUILD/csrc"
tar -C "$HERE" -cf - --exclude='*.so' --exclude=__pycache__ csrc vitfast setup.py | tar -C "$BUILD" -xf -
t0=$SECONDS
(cd "$BUILD" && VITFAST_BUILD=cuda MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/python" setup.py build_ext --inplace)
echo "prebuild: built in $((SECONDS - t0)) s"
# pack from the copy (its csrc/ and setup.py are this tree's, so the digests agree)
"$VENV/bin/python" scripts/prebuilt.py pack "$HERE/gpu_prebuilt" --root "$BUILD"
[ "$("$VENV/bin/python" scripts/prebuilt.py digest --root "$BUILD")" = "$("$VENV/bin/python" scripts/prebuilt.py digest)" ] \
  || { echo "prebuild: the copy's sources differ from this tree's" >&2; exit 1; }
du -sh "$HERE/gpu_prebuilt"
echo "prebuild: ready; carry gpu_prebuilt"
