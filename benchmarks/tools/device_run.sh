#!/usr/bin/env bash
# One call on the GPU machine runs the chosen stages, each under its own time limit, with its log
# streamed under $OUT, so a slow stage cannot swallow the others' results.
#   bash benchmarks/tools/device_run.sh [stages...] [-- benchmark args...]
# Stages (default: all, in this order): build tests memcheck launch swin bench.
#   build     build the CUDA extension (ninja) in the background while the others start
#   tests     the whole pytest suite, in four parallel processes
#   memcheck  compute-sanitizer memcheck of a small adapter fwd+bwd on the cuda and triton backends
#   launch    kernels per call, host cost per call, Triton registers/spills (benchmarks/tools/launch_profile.py)
#   profile   GPU time per kernel of one fwd+bwd, and CUDA-graph capture (benchmarks/tools/profile_adapter.py;
#             PROFILE_SHAPES="B,H,W,C ..." picks its shapes)
#   sweep     each Triton plan kernel's GPU time over its launch options against its byte budget
#             (benchmarks/tools/plan_sweep.py; PROFILE_SHAPES picks its shapes too)
#   swin      the Swin-B training step with its gradient-parity check (benchmarks/swin_step.py; SWIN_ARGS
#             passes it arguments, e.g. --graph; compiling Swin-Bs takes minutes: raise SWIN_S for --compile)
#   multiscale  the Swin-B backbone at a new detection size each step (benchmarks/swin_step.py --multiscale)
#   bench     python -m mona_kernels.benchmark with the arguments after --
# Limits in seconds: TESTS_S (300) MEMCHECK_S (180) LAUNCH_S (120) SWIN_S (150) MULTISCALE_S (240) BENCH_S (240);
# MEMCHECK_BACKENDS (cuda) names the backends the memcheck stage runs.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD  # the GPU machine has no network for an editable install
stages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do stages+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#stages[@]} -eq 0 ] && stages=(build tests memcheck launch swin bench)
has() { [[ " ${stages[*]} " == *" $1 "* ]]; }
SUMMARY="$OUT/summary.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$SUMMARY"
git log -1 --format='commit %h %s' >> "$SUMMARY" 2>/dev/null
if has build; then
  python3 -c "from mona_kernels.backends import cuda; cuda.load(); print('cuda extension built')" \
    > "$OUT/build.log" 2>&1 &
  BUILD_PID=$!
fi
wait_build() { [ -n "${BUILD_PID:-}" ] && { wait "$BUILD_PID"; echo "build: exit $?" >> "$SUMMARY"; BUILD_PID=; }; }
if has tests; then
  wait_build
  # the suite in four processes (Triton compiles on the CPU, one kernel at a time per process)
  groups=("tests/test_adapter.py" "tests/test_ops.py" "tests/test_compile.py tests/test_benchmark.py"
          "tests --ignore=tests/test_adapter.py --ignore=tests/test_ops.py --ignore=tests/test_compile.py --ignore=tests/test_benchmark.py")
  pids=()
  for k in 0 1 2 3; do
    timeout "${TESTS_S:-300}" python3 -m pytest ${groups[$k]} -q -p no:cacheprovider -rs > "/tmp/tests_$k.log" 2>&1 &
    pids+=($!)
  done
  for k in 0 1 2 3; do
    wait "${pids[$k]}"; echo "tests (${groups[$k]%% *}...): exit $?" >> "$SUMMARY"
    cat "/tmp/tests_$k.log" >> "$OUT/tests.log"
  done
fi
wait_build
if has memcheck; then
  for b in ${MEMCHECK_BACKENDS:-cuda}; do
    timeout "${MEMCHECK_S:-180}" compute-sanitizer --tool memcheck --leak-check no python3 benchmarks/tools/memcheck_case.py $b \
      >> "$OUT/memcheck.log" 2>&1
    echo "memcheck $b: exit $?" >> "$SUMMARY"
  done
fi
if has launch; then
  timeout "${LAUNCH_S:-120}" python3 benchmarks/tools/launch_profile.py >> "$OUT/launch.log" 2>&1
  echo "launch_profile: exit $?" >> "$SUMMARY"
fi
# stage NAME LIMIT LOG LABEL COMMAND...: when NAME was asked for, runs COMMAND under LIMIT seconds with
# its output in $OUT/LOG, and records its exit status in the summary as LABEL.
stage() {
  local name=$1 limit=$2 log=$3 label=$4
  shift 4
  has "$name" || return 0
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  echo "$label: exit $?" >> "$SUMMARY"
}
stage profile "${PROFILE_S:-180}" profile.log profile_adapter python3 benchmarks/tools/profile_adapter.py ${PROFILE_SHAPES:-}
stage sweep "${SWEEP_S:-240}" sweep.log plan_sweep python3 benchmarks/tools/plan_sweep.py ${PROFILE_SHAPES:-}
stage swin "${SWIN_S:-150}" swin.log swin_step python3 benchmarks/swin_step.py ${SWIN_ARGS:-}
stage multiscale "${MULTISCALE_S:-240}" multiscale.log swin_multiscale python3 benchmarks/swin_step.py --multiscale
stage bench "${BENCH_S:-240}" bench.log benchmark python3 -m mona_kernels.benchmark --out "$OUT" "$@"
cat "$SUMMARY"
for f in tests.log; do [ -f "$OUT/$f" ] && { echo "== $f"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/$f" | tail -8; }; done
[ -f "$OUT/memcheck.log" ] && { echo "== memcheck"; grep -E "ERROR SUMMARY|passed|Error" "$OUT/memcheck.log";
  echo "$(grep -c worst "$OUT/memcheck.log") cases checked against float64"; }
[ -f "$OUT/launch.log" ] && { echo "== launch"; grep -E "^\||tiny" "$OUT/launch.log"; }
[ -f "$OUT/profile.log" ] && { echo "== profile"; grep -v -i warn "$OUT/profile.log" | cut -c1-160; }
[ -f "$OUT/sweep.log" ] && { echo "== sweep"; grep "^|" "$OUT/sweep.log"; }
[ -f "$OUT/swin.log" ] && { echo "== swin"; grep -vi warn "$OUT/swin.log" | tail -14; }
[ -f "$OUT/multiscale.log" ] && { echo "== multiscale"; grep -vi warn "$OUT/multiscale.log" | tail -8; }
[ -f "$OUT/bench.log" ] && { echo "== bench"; grep "^| adapter\|^| multi\|^| ln" "$OUT/bench.log" | grep -v "fused\[torch\]" | cut -c1-200; }
exit 0
