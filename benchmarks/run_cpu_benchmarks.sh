#!/bin/bash
# Every CPU run behind benchmarks/RESULTS.md, each writing the files that
# RESULTS.md quotes into OUT_DIR: NAME.json, NAME.md and NAME.log for the
# benchmark_sampling.py runs, published_half_imagenet128_killed.log,
# half_precision_error.json/.md, training_fashion32.json, then one merged
# table (tables.md):
#   bash benchmarks/run_cpu_benchmarks.sh [OUT_DIR]      (default benchmarks/results)
# The runs interleave this fork and the published code (rebuilt in
# benchmarks/published_reference.py) on random weights. The published
# --use_fp16 path (float16 weights) takes minutes per step on a CPU without
# float16 convolutions: its ImageNet-128 step is stopped after 14 minutes
# (published_half_imagenet128_killed.log), its 32x32 steps are single runs.
# About 2 hours on one core of this project's CPU. THREADS (default 1) sets
# torch's threads; REPEATS (default 3) the repeats at 32x32 and 128x128.
# Pin it with taskset to keep other work off its cores:
#   taskset -c 1 bash benchmarks/run_cpu_benchmarks.sh
# ONLY=name1,name2 runs only those runs (names as the output files).
# training_fashion32 times training with 1 and 2 threads: give it the whole
# machine (ONLY=training_fashion32, no taskset).
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT"
PUBLISHED_HALF=published/half/plain,published/half/sag,published/half/sag_cg

selected() {  # selected NAME: whether this invocation runs NAME (see ONLY)
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]
}

run() {  # run NAME FLAGS...: one benchmark_sampling.py run into OUT/NAME.{json,md,log}
  local name=$1
  shift
  selected "$name" || return 0
  echo "$name"
  $PY benchmarks/benchmark_sampling.py --threads "$THREADS" "$@" \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1
}

# fp32 and --use_fp16 (ours), fp32 (published), peak memory: the main tables.
run fashion32 --archs fashion32 --repeats "$REPEATS" --steps 1,2 --memory --skip "$PUBLISHED_HALF"
run imagenet128 --archs imagenet128 --repeats "$REPEATS" --steps 1,2 --memory --skip "$PUBLISHED_HALF"
# bfloat16 weights forced for both implementations: the "bf16 (both)" rows.
run fashion32_bf16 --archs fashion32 --precisions bf16 --impls ours,published --modes plain,sag \
  --repeats "$REPEATS" --steps 1,2
run imagenet128_bf16 --archs imagenet128 --precisions bf16 --impls ours,published --modes plain,sag \
  --repeats "$REPEATS" --steps 1,2
# ImageNet-256: three runs of 1-2 repeats (a SAG step takes a minute on one core).
run imagenet256_timing_1repeat --archs imagenet256 --repeats 1 --steps 1,2 --skip "$PUBLISHED_HALF"
run imagenet256_fp32 --archs imagenet256 --precisions fp32 --impls ours,published --modes plain,sag \
  --repeats 2 --steps 1,2
run imagenet256_fp32_sag --archs imagenet256 --precisions fp32 --impls ours,published --modes sag \
  --repeats 1 --steps 1,2
# The published --use_fp16 path: single runs at 32x32; at 128x128 stopped after 14 minutes.
run published_half_fashion32 --archs fashion32 --impls published --precisions half --modes plain,sag \
  --repeats 0 --slow_s 0
if selected published_half_imagenet128_killed; then
  echo published_half_imagenet128_killed
  timeout 840 $PY benchmarks/benchmark_sampling.py --threads "$THREADS" --archs imagenet128 \
    --impls published --precisions half --modes plain --repeats 0 --slow_s 0 \
    > "$OUT/published_half_imagenet128_killed.log" 2>&1 || true
fi
# Half precision vs float32 samples on the golden checkpoints.
if selected half_precision_error; then
  echo half_precision_error
  $PY benchmarks/half_precision_error.py --threads 2 --precisions half,autocast \
    --json "$OUT/half_precision_error.json" --markdown "$OUT/half_precision_error.md"
fi
# Training speed of the default model's preset (its own threads per variant).
if selected training_fashion32; then
  echo training_fashion32
  $PY benchmarks/benchmark_training.py --steps 40 --json "$OUT/training_fashion32.json"
fi

tables=""
for name in fashion32 imagenet128 fashion32_bf16 imagenet128_bf16 imagenet256_fp32 \
    imagenet256_fp32_sag published_half_fashion32; do
  [ -f "$OUT/$name.json" ] && tables="$tables${tables:+,}$OUT/$name.json"
done
if [ -n "$tables" ]; then
  $PY benchmarks/benchmark_sampling.py --from_json "$tables" --markdown "$OUT/tables.md" > /dev/null
  echo "tables: $OUT/tables.md"
fi
