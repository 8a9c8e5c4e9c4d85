#!/bin/bash
# Page faults, kernel time and wall time of sampling with and without
# improved_diffusion/allocator.py (IMPROVED_DIFFUSION_MALLOPT=1 / 0), in
# alternating fresh processes on one thread (benchmarks/RESULTS.md, "Page faults"):
#   taskset -c 1 bash benchmarks/allocator_ab.sh [OUT_FILE]   (default benchmarks/results/allocator_ab.txt)
# 1. the embedded default model through scripts/image_sample.py (its card:
#    SAG 0.8), 64 samples, 10 steps, three pairs of runs;
# 2. one ImageNet-128 step (random weights, batch 1, fp32), plain and SAG,
#    twice per process, two pairs of processes (benchmarks/benchmark_sampling.py's
#    variants). Each line: wall, user and system seconds, minor page faults.
set -e
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/allocator_ab.txt}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
: > "$OUT"
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$RUN_DIR"' EXIT
for pair in 1 2 3; do
  for keep in 0 1; do
    rm -rf "$RUN_DIR/run"
    IMPROVED_DIFFUSION_MALLOPT=$keep OPENAI_LOGDIR="$RUN_DIR/run" /usr/bin/time -o "$RUN_DIR/time" \
      -f "%e s wall, %U s user, %S s system, %R page faults" \
      $PY scripts/image_sample.py --num_samples 64 --batch_size 64 --timestep_respacing 10 > /dev/null 2>&1
    echo "default model, 64 samples, 10 steps, SAG 0.8: MALLOPT=$keep: $(cat "$RUN_DIR/time")" | tee -a "$OUT"
  done
done
for pair in 1 2; do
  for keep in 0 1; do
    IMPROVED_DIFFUSION_MALLOPT=$keep $PY - >> "$OUT" <<'EOF'
import os, resource, sys, time
sys.path.insert(0, "benchmarks")
import torch as th
import benchmark_sampling as bs
from improved_diffusion.allocator import keep_freed_memory

keep_freed_memory()  # does nothing under IMPROVED_DIFFUSION_MALLOPT=0
th.set_num_threads(1)
variants = bs.build_variants("imagenet128", ["ours"], "fp32", ["plain", "sag"], "cpu", 1)
with th.no_grad():
    for v in variants:
        v.run(1)  # warm-up
    for _ in range(2):
        for v in variants:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            v.run(1)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            print(f"ImageNet-128 step, {v.name}: MALLOPT={os.environ['IMPROVED_DIFFUSION_MALLOPT']}: "
                  f"{t1 - t0:.2f} s wall, {r1.ru_utime - r0.ru_utime:.2f} s user, "
                  f"{r1.ru_stime - r0.ru_stime:.2f} s system, {r1.ru_minflt - r0.ru_minflt} page faults",
                  flush=True)
EOF
    tail -n 4 "$OUT"
  done
done
