#!/bin/bash
# The CPU benchmark behind benchmarks/RESULTS.md, then one merged table:
#   bash benchmarks/run_cpu_benchmarks.sh [OUT_DIR]      (default benchmarks/results)
# Per architecture, one run interleaves this fork (float32 and --use_fp16)
# with the published code in float32, and measures peak memory. The
# published --use_fp16 path (float16 weights) takes minutes per step on a
# CPU without float16 convolutions, so it is timed last, by single runs
# (plain and SAG; at 128x128 and the 32x32 default only).
# About an hour on one core of this project's CPU. THREADS (default 1) sets
# torch's threads; REPEATS (default 3) the repeats at 32x32 and 128x128
# (256x256 gets 2). Pin it with taskset to keep other work off its cores:
#   taskset -c 1 bash benchmarks/run_cpu_benchmarks.sh
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT"
BENCH="$PY benchmarks/benchmark_sampling.py --threads $THREADS"
PUBLISHED_HALF=published/half/plain,published/half/sag,published/half/sag_cg

for arch in fashion32 imagenet128 imagenet256; do
  repeats=$REPEATS
  [ "$arch" = imagenet256 ] && repeats=2
  $BENCH --archs "$arch" --repeats "$repeats" --steps 1,2 --memory --skip "$PUBLISHED_HALF" \
    --json "$OUT/$arch.json" --markdown "$OUT/$arch.md" > "$OUT/$arch.log" 2>&1
done
$BENCH --archs imagenet128,fashion32 --impls published --precisions half --modes plain,sag \
  --repeats 0 --slow_s 0 --json "$OUT/published_half.json" --markdown "$OUT/published_half.md" \
  > "$OUT/published_half.log" 2>&1
$PY benchmarks/benchmark_sampling.py \
  --from_json "$OUT/fashion32.json,$OUT/imagenet128.json,$OUT/imagenet256.json,$OUT/published_half.json" \
  --markdown "$OUT/tables.md" > /dev/null
echo "tables: $OUT/tables.md"
