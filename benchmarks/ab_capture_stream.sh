#!/usr/bin/env bash
# Same-call A/B of the CUDA backend's capture stream (session 14): the previous commit's
# csrc/adapter.cpp (a new pool stream per capture) against the working tree's (one stream per
# device). Each builds the extension (ninja rebuilds adapter.cpp alone), runs the capture-memory
# GPU test, and times the adapter benchmark's peak memory. Writes under $OUT.
#   OUT=out bash benchmarks/ab_capture_stream.sh [base-commit | old adapter.cpp file]
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
base=${1:-HEAD}
cp csrc/adapter.cpp /tmp/adapter_new.cpp
trap 'cp /tmp/adapter_new.cpp csrc/adapter.cpp' EXIT  # the tree's own source back, however the script ends
for side in old new; do
  if [ $side = new ]; then cp /tmp/adapter_new.cpp csrc/adapter.cpp
  elif [ -f "$base" ]; then cp "$base" csrc/adapter.cpp
  else git show "$base:csrc/adapter.cpp" > csrc/adapter.cpp || exit 1; fi
  python3 -c "from mona_kernels.ops import cuda_ext; cuda_ext.load()" > "$OUT/build_$side.log" 2>&1
  echo "[$side] build: exit $?"
  timeout 200 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -k captures_leave_no_memory > "$OUT/test_$side.log" 2>&1
  echo "[$side] capture-memory test: exit $?"; grep -E "MiB|passed|failed" "$OUT/test_$side.log" | tail -4
  timeout 200 python3 -m mona_kernels.benchmark --ops adapter --no-compile --reps 20 --out "$OUT/bench_$side" \
    > "$OUT/bench_$side.log" 2>&1
  echo "[$side] benchmark: exit $?"
  python3 - "$OUT/bench_$side/benchmark.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    if r["variant"] in ("reference", "fused[triton]", "fused[cuda]"):
        print(f'  {r["shape"]:>14} {r["variant"]:>14} peak {float(r["peak_mb"]):7.1f} MB  fwd+bwd {float(r["fwd_bwd_ms"]):.3f} ms')
PY
done
