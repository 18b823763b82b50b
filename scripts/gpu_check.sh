#!/usr/bin/env bash
# The GPU check, sized for 15 device-minutes a session (machine start ~1-2 min included): two
# commands, the most valuable answers first. Each step has its own time limit, so a hang loses
# only that step; every step prints its elapsed time.
#
#   bash scripts/gpu_check.sh first  [OUTDIR]   # <= 8 min: (1) build for this GPU with all cores,
#       (2) the -m cuda tests (ops vs float64, then the timm peer checks), (3) compute-sanitizer
#       memcheck on small cases of every kernel, racecheck on one small case per kernel, (4) op
#       benchmarks against same-run baselines (no torch.compile) -> RESULTS.md, (5) Nsight
#       Compute sections of every kernel at its bar shape -> profiles.txt
#   bash scripts/gpu_check.sh second [OUTDIR]   # <= 4 min, same warm machine (reuses the build):
#       Swin / TinyViT end to end, train and inference, eager and compiled -> appended to RESULTS.md
#   bash scripts/gpu_check.sh recheck [OUTDIR]  # after fixing what "first" found, fresh machine: build, the op
#       tests, the head-mix no-fit check (cuda-gdb backtrace if it crashes), bench, kernel times,
#       memcheck, models, racecheck (smallest cases), ncu of the kernels not yet profiled
#   bash scripts/gpu_check.sh bars   [OUTDIR]   # a session after recheck + second, <= 8 min: issue 13's
#       compiled Mini-DeiT-S / Mini-Swin-T steps against DeiT-S / Swin-T, issue 12's cait_s24 step
#   bash scripts/gpu_check.sh bars2  [OUTDIR]   # <= 4 min, warm: Mini-DeiT-S with eager talking heads
#       (against bars' results), the lowrank DeiT-B search time
#   bash scripts/gpu_check.sh later  [OUTDIR]   # a later session: CaiT and MiniViT models end to end, the
#       torch.compile tests and op baselines, synccheck/initcheck, pipeline timings
#
# A prebuilt extension (scripts/prebuilt.py; run(carry=["gpu_wheels", "gpu_prebuilt"])) replaces the
# build step when it was built from this tree for this Python, torch and GPU; otherwise it builds.
#
# OUTDIR defaults to $OUT. At most 8 files come back from a device call, so logs are packed into
# logs.tar.xz; RESULTS.md, results.json, profiles.txt and summary.txt sit beside it. Copy
# RESULTS.md to benchmarks/ and profiles.txt to benchmarks/profiles/ afterwards.
# Needs: python with a CUDA torch, ninja, pytest; nvcc; compute-sanitizer; ncu (optional).
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-first}"
OUTDIR="${2:-${OUT:-gpu_out}}"
mkdir -p "$OUTDIR/logs"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VITFAST_BUILD=cuda MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # only the GPU that is here (sm_90 on H100/H200)
  TORCH_CUDA_ARCH_LIST="$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST
fi
# the parity fuzz (tests/test_check_parity.py) needs hypothesis, which the device cannot download
# (its image lists it since 2026-11, not yet seen by one of our calls): carry its pure-Python
# wheels (`pip download --no-deps -d gpu_wheels hypothesis==6.155.2 sortedcontainers==2.4.0`,
# run(carry=["gpu_wheels"])); without them those tests skip
if [ -d gpu_wheels ] && ! $PY -c 'import hypothesis' 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links gpu_wheels hypothesis >/dev/null 2>&1 || echo "gpu_wheels: install failed"
fi
T0=$SECONDS
declare -a ORDER
declare -A STATUS
# GPU_CHECK_DEADLINE (s): steps are cut to end by then and skipped when under 15 s would be left, so
# the summary and the packed logs are always written before the device call's own limit
DEADLINE="${GPU_CHECK_DEADLINE:-100000}"
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log, remember pass/fail and seconds
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - (SECONDS - T0)))
  if [ "$left" -lt 15 ]; then
    ORDER+=("$name"); STATUS[$name]="SKIPPED (deadline)"; echo "=== $name: skipped (deadline)"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS log="$OUTDIR/logs/$name.log"
  echo "=== [$((SECONDS - T0))s] $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  ORDER+=("$name")
  STATUS[$name]="$([ $rc -eq 0 ] && echo PASS || { [ $rc -eq 124 ] && echo "TIMEOUT" || echo "FAIL (rc $rc)"; }) $((SECONDS - t0))s"
  echo "    ${STATUS[$name]}"
  tail -n 4 "$log" | sed 's/^/    /'
  return $rc
}
RESULTS_BASE=0  # lines of RESULTS.md that were there before this call (results_md)
results_md() {  # the phases after first/recheck append to a copy of benchmarks/RESULTS.md
  [ -f "$OUTDIR/RESULTS.md" ] || cp benchmarks/RESULTS.md "$OUTDIR/RESULTS.md"
  RESULTS_BASE=$(wc -l <"$OUTDIR/RESULTS.md")
}
finish() {
  {
    echo "gpu_check.sh $PHASE: $((SECONDS - T0))s in all"
    echo "| step | result |"
    echo "|---|---|"
    for s in "${ORDER[@]}"; do echo "| $s | ${STATUS[$s]} |"; done
    # the bars this call measured: not those of the benchmarks/RESULTS.md a phase appends to
    [ -f "$OUTDIR/RESULTS.md" ] && tail -n +"$((RESULTS_BASE + 1))" "$OUTDIR/RESULTS.md" | grep -E '\| (PASS|FAIL) \|$'
  } | tee "$OUTDIR/summary.txt"
  tar -C "$OUTDIR" -cJf "$OUTDIR/logs.tar.xz" logs && rm -rf "$OUTDIR/logs"
  for s in "${ORDER[@]}"; do [[ ${STATUS[$s]} == PASS* || ${STATUS[$s]} == "NOT USED"* ]] || exit 1; done
  exit 0
}

# (1) build, unless a prebuilt extension of this very tree was carried here and runs (gpu_prebuilt/,
# scripts/prebuilt.py: built on the CPU machine with the device's Python and torch; it saves the
# build's minutes), or this warm machine already holds a CUDA build of this tree
if [ -d gpu_prebuilt ] && step prebuilt 60 bash -c "$PY scripts/prebuilt.py install gpu_prebuilt && $PY scripts/prebuilt.py check"; then
  echo "=== build: the carried prebuilt extension (gpu_prebuilt/) is this tree's and ran a kernel here"
else
  [ -d gpu_prebuilt ] && STATUS[prebuilt]="NOT USED (see logs/prebuilt.log): built instead"
  if $PY -c 'import sys, vitfast; i = vitfast.build_info(); sys.exit(0 if i["loaded"] and i["cuda"] else 1)' 2>/dev/null \
      && [ "$PHASE" != first ] && [ ! -d gpu_prebuilt ]; then
    echo "=== build: reusing the extension already built on this machine"
  else
    step build 240 $PY setup.py build_ext --inplace || { finish; }
  fi
fi
$PY -m vitfast info >"$OUTDIR/logs/info.log" 2>&1
{ echo "stream code of libstdc++ defined inside _C (must be 0): $(nm -C --defined-only vitfast/_C*.so 2>/dev/null \
    | grep -c 'std::ostream::_M_insert')"; echo "CXX=${CXX:-} libstdc++.so: $(${CXX:-c++} -print-file-name=libstdc++.so)"; } \
  >>"$OUTDIR/logs/info.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
  >>"$OUTDIR/logs/info.log" 2>&1

SAN=(compute-sanitizer --error-exitcode 1 --kernel-name kns=vitfast)
case "$PHASE" in
  first)
    step toolchain 60 $PY -m pytest -q -rfs --tb=short tests/test_build.py
    # (2) correctness, fail-early: the ops against float64, then the timm peer checks
    # (torch.compile of the ops on CUDA costs tens of seconds per test: the "later" phase)
    step tests-ops 140 $PY -m pytest -q -rs -m cuda -k "not torch_compile" --maxfail=20 \
      tests/test_head_mix_attention.py tests/test_window_attention.py tests/test_topk_softmax.py \
      tests/test_soft_target_ce.py tests/test_covariance.py tests/test_fallback.py tests/test_op_edges.py \
      tests/test_check_parity.py
    step tests-models 110 $PY -m pytest -q -rs -m cuda --maxfail=20 tests/test_patch.py tests/test_patch_cait.py
    # (3) sanitizers: every kernel's small cases under memcheck; racecheck on one case per kernel
    step memcheck 80 "${SAN[@]}" --tool memcheck $PY scripts/sanitize_cases.py
    step racecheck 50 "${SAN[@]}" --tool racecheck --racecheck-report all $PY scripts/sanitize_cases.py --smallest
    step nofit 40 $PY scripts/head_mix_nofit_check.py
    # (4) op benchmarks against same-run baselines (no torch.compile: that is the "later" phase)
    step bench 90 $PY benchmarks/run_gpu.py --no-compile --json "$OUTDIR/results.json" --markdown "$OUTDIR/RESULTS.md"
    # (5) Nsight Compute: each kernel once at its bar shape, the sections the tuning plan needs
    if command -v ncu >/dev/null; then
      step ncu 90 ncu --target-processes all --profile-from-start off --kernel-name-base demangled --kernel-name regex:vitfast \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --log-file "$OUTDIR/profiles.txt" \
        $PY benchmarks/ncu_cases.py
    fi
    ;;
  recheck)
    # after fixing what a "first" run found, on a fresh machine: the fixed paths first; the
    # build's own checks (a native error message formats, no embedded libstdc++) before anything
    step toolchain 60 $PY -m pytest -q -rfs --tb=short tests/test_build.py
    step tests-ops 140 $PY -m pytest -q -rfs -m cuda -k "not torch_compile" --tb=short \
      tests/test_head_mix_attention.py tests/test_window_attention.py tests/test_topk_softmax.py \
      tests/test_soft_target_ce.py tests/test_covariance.py tests/test_fallback.py tests/test_op_edges.py \
      tests/test_check_parity.py
    step nofit 40 $PY scripts/head_mix_nofit_check.py || \
      step nofit-gdb 90 cuda-gdb -batch -ex run -ex bt -ex quit --args $PY scripts/head_mix_nofit_check.py
    step bench 90 $PY benchmarks/run_gpu.py --no-compile --json "$OUTDIR/results.json" --markdown "$OUTDIR/RESULTS.md"
    step kernel-times 60 $PY benchmarks/kernel_times.py --json "$OUTDIR/kernel_times.json"
    step host-overhead 30 $PY benchmarks/host_overhead.py --reps 500 --json "$OUTDIR/host_overhead.json"
    step memcheck 80 "${SAN[@]}" --tool memcheck $PY scripts/sanitize_cases.py
    step tests-models 110 $PY -m pytest -q -rfs -m cuda --tb=short tests/test_patch.py tests/test_patch_cait.py
    # the register kernels' shared dS^T / bias-gradient buffers (its first window case runs them);
    # late, so the deadline cuts it before the model checks
    step racecheck 50 "${SAN[@]}" --tool racecheck --racecheck-report all $PY scripts/sanitize_cases.py --smallest
    # Nsight Compute of the kernels no GPU has profiled yet (register window and head-mix kernels,
    # streaming and head-split head-mix kernels), for tuning without a GPU; last: whatever time the
    # carried prebuilt saved (gpu_prebuilt/) lets it run
    if command -v ncu >/dev/null; then
      step ncu 90 ncu --target-processes all --profile-from-start off --kernel-name-base demangled \
        --kernel-name regex:vitfast --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --log-file "$OUTDIR/profiles.txt" $PY benchmarks/ncu_cases.py \
        --match '^(window|head_mix)_attention .*(fwd\+bwd|\((streaming|head-split)[^)]*\))$'
    fi
    ;;
  second)
    # (6) models end to end; appends to the first command's RESULTS.md when it is here
    results_md
    step models 225 $PY benchmarks/window_models_gpu.py --reps 10 --json "$OUTDIR/models_gpu.json" \
      --append-markdown "$OUTDIR/RESULTS.md"
    ;;
  bars)
    # the bars of issues 12 and 13 (compiled training steps, bs 128), for a session after recheck +
    # second: each compile is ~25-90 s, so the pairs a bar compares come first and together
    results_md
    mkdir -p gpu_out  # survives to bars2 on the warm machine ($OUT does not)
    step minivit 230 $PY benchmarks/minivit_gpu.py --models deit_small_patch16_224 "mini_deit_small (fused)" \
      swin_tiny_patch4_window7_224 "mini_swin_tiny (fused)" --profile-top 12 --json gpu_out/minivit_gpu.json \
      --append-markdown "$OUTDIR/RESULTS.md"
    cp gpu_out/minivit_gpu.json "$OUTDIR/" 2>/dev/null
    step cait 170 $PY benchmarks/window_models_gpu.py --models cait_s24_224 --variants compiled "patched+compiled" \
      "patched(fused)+compiled" --profile-top 12 --json "$OUTDIR/cait_gpu.json" --append-markdown "$OUTDIR/RESULTS.md"
    ;;
  bars2)
    # the same warm machine, <= 4 min: issue 13's fused-vs-eager-talking-heads bar (against bars'
    # results) and issue 15's DeiT-B search time (predicted 50-100 s; the relation losses' share
    # stays in `later`)
    results_md
    PREV=(); [ -f gpu_out/minivit_gpu.json ] && PREV=(--previous gpu_out/minivit_gpu.json)
    step minivit-eager 80 $PY benchmarks/minivit_gpu.py --models "mini_deit_small (eager talking heads)" ${PREV[@]+"${PREV[@]}"} \
      --json "$OUTDIR/minivit_gpu2.json" --append-markdown "$OUTDIR/RESULTS.md"
    step lowrank 150 $PY benchmarks/lowrank_gpu.py --json "$OUTDIR/lowrank_gpu.json"
    ;;
  later)
    results_md
    step head-mix-models 420 $PY benchmarks/window_models_gpu.py --models cait_s24_224 --json "$OUTDIR/cait_gpu.json" \
      --append-markdown "$OUTDIR/RESULTS.md"
    step minivit 420 $PY benchmarks/minivit_gpu.py --profile-top 12 --json "$OUTDIR/minivit_gpu.json" --append-markdown "$OUTDIR/RESULTS.md"
    step minivit-relations 120 $PY benchmarks/minivit_relations.py --json "$OUTDIR/minivit_relations.json" \
      --append-markdown "$OUTDIR/RESULTS.md"
    step tests-compile 240 $PY -m pytest -q -rs -m cuda -k torch_compile tests
    step bench-compiled 300 $PY benchmarks/run_gpu.py --json "$OUTDIR/results_compiled.json" \
      --markdown "$OUTDIR/RESULTS_compiled.md"
    step synccheck 120 "${SAN[@]}" --tool synccheck $PY scripts/sanitize_cases.py --smallest
    step initcheck 120 "${SAN[@]}" --tool initcheck $PY scripts/sanitize_cases.py --smallest
    step lowrank 200 $PY benchmarks/lowrank_gpu.py --json "$OUTDIR/lowrank_gpu.json"
    step tinyvit 200 $PY benchmarks/tinyvit_gpu.py --json "$OUTDIR/tinyvit_gpu.json"
    ;;
  *)
    echo "gpu_check.sh: phase must be first, recheck, second, bars, bars2 or later, got '$PHASE'" >&2
    exit 2
    ;;
esac
finish
