#!/usr/bin/env bash
# Everything a fresh machine needs: a virtual environment (.venv) with the pinned dependencies, and
# vitfast installed in editable mode with its extension compiled (CUDA kernels whenever nvcc and
# a CUDA build of torch are present; a GPU is not needed). Idempotent: re-running rebuilds only
# what changed.
#   PYTHON=python3.11   interpreter for the venv        VITFAST_VENV=.venv   where it lives
#   VITFAST_BUILD=auto|cpu|cuda, TORCH_CUDA_ARCH_LIST, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VITFAST_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -r requirements.txt
echo "install.sh: building vitfast (the CUDA kernels take a few minutes on 2 cores)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import vitfast, sys; i = vitfast.build_info(); sys.exit(0 if i['loaded'] else 1)" || {
  echo "install.sh: vitfast._C did not build or import" >&2; exit 1; }
"$VENV/bin/python" -m vitfast info | sed -n 2,3p  # what was built
