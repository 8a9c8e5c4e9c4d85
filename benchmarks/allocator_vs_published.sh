#!/bin/bash
# This fork as its sampling scripts run it (improved_diffusion/allocator.py:
# --allocator keep) against the published SAG step as the published scripts
# run it (the C library's allocator: --allocator default), ImageNet-128
# architecture, fp32, batch 1, one thread; separate processes, alternating,
# ROUNDS times (default 2), each process 2 repeats (benchmarks/RESULTS.md, "Page faults"):
#   taskset -c 1 bash benchmarks/allocator_vs_published.sh [OUT_DIR]   (default benchmarks/results)
# writes OUT_DIR/imagenet128_ours_keep_R.{json,md,log} and imagenet128_published_default_R.{json,md,log}.
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in "ours keep" "published default"; do
    set -- $side
    name="imagenet128_$1_$2_$r"
    $PY benchmarks/benchmark_sampling.py --threads 1 --archs imagenet128 --precisions fp32 \
      --modes plain,sag --impls "$1" --allocator "$2" --repeats 2 \
      --json "$OUT/$name.json" --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1
    echo "$name: $(grep -c repeat "$OUT/$name.log") timed runs"
  done
done
