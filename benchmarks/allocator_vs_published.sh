#!/bin/bash
# This fork as its sampling scripts run it (improved_diffusion/allocator.py:
# --allocator keep) against the published SAG step as the published scripts
# run it (the C library's allocator: --allocator default), ImageNet-128
# architecture, fp32, batch 1, one thread; separate processes, alternating,
# ROUNDS times (default 2), each process REPEATS repeats (default 2)
# (benchmarks/RESULTS.md, "Page faults"):
#   taskset -c 1 bash benchmarks/allocator_vs_published.sh [OUT_DIR]   (default benchmarks/results)
# writes OUT_DIR/${NAME}_ours_keep_R.{json,md,log} and ${NAME}_published_default_R.{json,md,log}
# (NAME default imagenet128), then prints ours / published per round (the two
# processes of a round ran back to back) with a 95 % interval for its median.
# MODES (default plain,sag), STEPS (default 1,2) and TIMING (default runs;
# within: benchmark_sampling.py --timing within) pass through.
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
NAME=${NAME:-imagenet128}
MODES=${MODES:-plain,sag}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in "ours keep" "published default"; do
    set -- $side
    name="${NAME}_$1_$2_$r"
    $PY benchmarks/benchmark_sampling.py --threads 1 --archs imagenet128 --precisions fp32 \
      --modes "$MODES" --impls "$1" --allocator "$2" --repeats "${REPEATS:-2}" \
      --steps "${STEPS:-1,2}" --timing "${TIMING:-runs}" \
      --json "$OUT/$name.json" --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1
    echo "$name: $(grep -c repeat "$OUT/$name.log") timed runs"
  done
done
$PY - "$OUT" "$NAME" "${ROUNDS:-2}" "$MODES" <<'PYEOF'
import json, statistics, sys
sys.path.insert(0, "benchmarks")
from benchmark_sampling import median_interval

out, name, rounds, modes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
for mode in modes:
    ratios = []
    for r in range(1, rounds + 1):
        step = {}
        for impl, alloc in (("ours", "keep"), ("published", "default")):
            with open(f"{out}/{name}_{impl}_{alloc}_{r}.json") as f:
                step[impl] = json.load(f)["timing"]["imagenet128"][f"{impl}/fp32/{mode}"]["median"]
        ratios.append(step["ours"] / step["published"])
    interval = median_interval(ratios)
    print(f"{mode}: ours / published per round, median {statistics.median(ratios):.3f}"
          + (f" (95 % interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
          + ", rounds " + " ".join(f"{q:.3f}" for q in ratios))
PYEOF
