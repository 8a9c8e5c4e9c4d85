#!/bin/bash
# The CPU benchmark behind benchmarks/RESULTS.md: three runs (one per
# architecture, variants interleaved within each), then one merged table.
# Hours on a 2-core CPU, mostly the published float16 path (float16
# convolutions on a CPU without native float16 take minutes per step), so
# its SAG + classifier variant is skipped, and at 256x256 all of it.
#   bash benchmarks/run_cpu_benchmarks.sh [OUT_DIR]      (default benchmarks/results)
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
mkdir -p "$OUT"
run() {
  local arch=$1 skip=$2
  OMP_NUM_THREADS=$THREADS $PY benchmarks/benchmark_sampling.py --archs "$arch" --threads "$THREADS" \
    --repeats 3 --steps 1,2 --memory --skip "$skip" --json "$OUT/$arch.json" --markdown "$OUT/$arch.md"
}
run fashion32 published/half/sag_cg
run imagenet128 published/half/sag_cg
run imagenet256 published/half/plain,published/half/sag,published/half/sag_cg
$PY benchmarks/benchmark_sampling.py --from_json "$OUT/fashion32.json,$OUT/imagenet128.json,$OUT/imagenet256.json" \
  --markdown "$OUT/tables.md"
