#!/usr/bin/env bash
# One call on a fresh GPU machine: build for the local GPU with all cores, run the CUDA tests,
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over small cases of every kernel,
# the pytest-benchmark suite and the same-run baseline benchmarks. Logs and JSON go to the folder
# given as $1 (default: $OUT, else ./gpu_out); it ends with a short summary table.
# $2 picks a phase, each meant to fit one 10-minute device call: check (build, the CUDA-marked
# tests incl. the timm peer checks at 224, memcheck), sanitize (racecheck, synccheck, initcheck),
# bench (op benchmarks -> RESULTS.md), pipelines (lowrank and tinyvit pipeline timings), models
# (Swin/TinyViT end-to-end train/infer, appended to RESULTS.md), or all (default). CPU tests are
# CI's job. With 30 device-minutes a session, order them: check, bench, models, pipelines, sanitize.
# The build takes minutes and each device call starts bare: the check phase leaves the stripped
# extension in $OUT; carry it into the next calls and set VITFAST_PREBUILT=1 to skip the build:
#   bash scripts/gpu_check.sh "$OUT" check          # on the device; then here: xz -dc FILES_AT/_C*.so.xz > vitfast/_C...so
#   VITFAST_PREBUILT=1 bash scripts/gpu_check.sh "$OUT" sanitize   # run(carry=["vitfast/_C....so"])
#   VITFAST_PREBUILT=1 bash scripts/gpu_check.sh "$OUT" bench      # then copy $OUT/RESULTS.md to benchmarks/
#   VITFAST_PREBUILT=1 bash scripts/gpu_check.sh "$OUT" models     # then copy $OUT/RESULTS.md again
#   VITFAST_PREBUILT=1 bash scripts/gpu_check.sh "$OUT" pipelines
#   SKIP_COMPILE_BASELINES=1 bash scripts/gpu_check.sh out   # faster: no torch.compile baselines
# Each step has a time limit (STEP_TIMEOUT seconds, default 420) so one stuck step still leaves
# the others' logs.
# Needs: python with torch (CUDA), ninja, pytest, pytest-benchmark; nvcc; compute-sanitizer.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-gpu_out}}"
PHASE="${2:-all}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VITFAST_BUILD=cuda MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Build for the GPU that is here (sm_90 on the H100/H200) unless told otherwise.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST
fi
declare -A STATUS
step() {  # step NAME LOGFILE CMD...: run, log, remember pass/fail
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUTDIR/$log"
  timeout "${STEP_TIMEOUT:-420}" "$@" >>"$OUTDIR/$log" 2>&1
  local rc=$?
  STATUS[$name]="$([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") $((SECONDS - t0))s"
  tail -n 5 "$OUTDIR/$log"
  return $rc
}

SO_NAME="$($PY -c 'import sysconfig; print("_C" + sysconfig.get_config_var("EXT_SUFFIX"))')"
if [ "${VITFAST_PREBUILT:-0}" = 1 ] && [ -f "vitfast/$SO_NAME" ]; then
  echo "=== build: skipped, using the carried vitfast/$SO_NAME" | tee -a "$OUTDIR/build.log"
else
  step build build.log $PY setup.py build_ext --inplace || { echo "build failed"; tail -n 60 "$OUTDIR/build.log"; exit 1; }
  # for the next calls: stripped and xz-compressed (~1.5 MB; $OUT files come back up to 16 MiB)
  strip --strip-debug -o "/tmp/$SO_NAME" "vitfast/$SO_NAME" 2>/dev/null || cp "vitfast/$SO_NAME" "/tmp/$SO_NAME"
  $PY -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.compress(open(sys.argv[1], "rb").read()))' \
    "/tmp/$SO_NAME" "$OUTDIR/$SO_NAME.xz"
fi
$PY -m vitfast info | tee -a "$OUTDIR/build.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$OUTDIR/build.log"

SAN=(compute-sanitizer --error-exitcode 1 --kernel-name kns=vitfast)
if [ "$PHASE" = all ] || [ "$PHASE" = check ]; then
  step tests tests.log $PY -m pytest -q -rs -m cuda tests
  step memcheck sanitizer.log "${SAN[@]}" --tool memcheck $PY scripts/sanitize_cases.py
fi
if [ "$PHASE" = all ] || [ "$PHASE" = sanitize ]; then
  step racecheck sanitizer.log "${SAN[@]}" --tool racecheck --racecheck-report all $PY scripts/sanitize_cases.py
  step synccheck sanitizer.log "${SAN[@]}" --tool synccheck $PY scripts/sanitize_cases.py
  step initcheck sanitizer.log "${SAN[@]}" --tool initcheck $PY scripts/sanitize_cases.py
fi
COMPILE_FLAG=()
[ "${SKIP_COMPILE_BASELINES:-0}" = 1 ] && COMPILE_FLAG=(--no-compile)
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  STEP_TIMEOUT=${STEP_TIMEOUT:-560} step pytest-benchmark bench.log $PY -m pytest -q benchmarks/bench_ops.py --benchmark-columns=median,iqr,rounds
  STEP_TIMEOUT=${STEP_TIMEOUT:-560} step baselines bench.log $PY benchmarks/run_gpu.py "${COMPILE_FLAG[@]}" --json "$OUTDIR/results.json" \
    --markdown "$OUTDIR/RESULTS.md"
  cp "$OUTDIR/RESULTS.md" benchmarks/RESULTS.md 2>/dev/null
fi
if [ "$PHASE" = all ] || [ "$PHASE" = pipelines ]; then
  step lowrank bench.log $PY benchmarks/lowrank_gpu.py --json "$OUTDIR/lowrank_gpu.json"
  step tinyvit bench.log $PY benchmarks/tinyvit_gpu.py --json "$OUTDIR/tinyvit_gpu.json"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = models ]; then
  # appends its section to benchmarks/RESULTS.md: copy the bench phase's RESULTS.md in first
  STEP_TIMEOUT=${STEP_TIMEOUT:-560} step models bench.log $PY benchmarks/window_models_gpu.py "${COMPILE_FLAG[@]}" --json "$OUTDIR/models_gpu.json" \
    --append-markdown benchmarks/RESULTS.md
  cp benchmarks/RESULTS.md "$OUTDIR/RESULTS.md" 2>/dev/null
fi

{
  echo
  echo "| step | result |"
  echo "|---|---|"
  for s in build tests memcheck racecheck synccheck initcheck pytest-benchmark baselines lowrank tinyvit models; do
    echo "| $s | ${STATUS[$s]:-not run} |"
  done
  [ -f "$OUTDIR/RESULTS.md" ] && grep -E '\| (PASS|FAIL) \|$' "$OUTDIR/RESULTS.md"
}  # (printed only: $OUT returns at most 8 files)
for s in "${!STATUS[@]}"; do [[ ${STATUS[$s]} == PASS* ]] || exit 1; done
