#!/usr/bin/env bash
# One call on the GPU machine: install, run every test, run the benchmark; logs and CSV under $OUT.
# Usage: bash benchmarks/device_run.sh [benchmark args...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD  # the GPU machine has no network for an editable install
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
python3 -m mona_kernels.benchmark --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^\['
