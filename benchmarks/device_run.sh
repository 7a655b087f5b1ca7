#!/usr/bin/env bash
# One call on the GPU machine: every test, the Swin-B step and the benchmark, each stage under its own
# time limit with its log streamed under $OUT, so a slow stage cannot swallow the others' results.
# Usage: bash benchmarks/device_run.sh [benchmark args...]   (env TESTS_S, SWIN_S, BENCH_S: limits)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD  # the GPU machine has no network for an editable install
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-300}" python3 -m pytest tests -q -p no:cacheprovider --durations=10 > "$OUT/tests.log" 2>&1
echo "tests: exit $?"
timeout "${SWIN_S:-150}" python3 benchmarks/swin_step.py > "$OUT/swin.log" 2>&1
echo "swin_step: exit $?"
timeout "${BENCH_S:-240}" python3 -m mona_kernels.benchmark --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "benchmark: exit $?"
echo "== tests";  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -8
echo "== swin";   grep -vi warn "$OUT/swin.log" | tail -12
echo "== bench";  grep "^|" "$OUT/bench.log" | grep -v "fused\[torch\]"
