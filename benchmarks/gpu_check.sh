#!/bin/bash
# One prepared run on a GPU machine (about 4 minutes on an H100/H200):
# the CUDA tests, then images per second of SAG sampling at the ImageNet-256
# architecture, batch 16, plain and SAG, fp32 / --use_fp16 (float16) /
# bfloat16, this fork and the published code, then peak memory of the
# --use_fp16 variants. MEMORY=0 skips the memory runs; PRECISIONS picks.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default benchmarks/results_gpu)
# PY names the Python that has torch with CUDA (default python3).
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results_gpu}
PY=${PY:-python3}
PRECISIONS=${PRECISIONS:-fp32,half,bf16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_perf_attention.py \
  tests/test_random_util.py 2>&1 | tee "$OUT/pytest.log" | tail -n 25
BENCH="$PY benchmarks/benchmark_sampling.py --device cuda --archs imagenet256 --batch 16"
timeout 300 $BENCH --precisions "$PRECISIONS" --impls ours,published --modes plain,sag \
  --repeats 3 --steps 2,6 --json "$OUT/imagenet256_b16.json" --markdown "$OUT/imagenet256_b16.md" \
  2> "$OUT/imagenet256_b16.log"
[ "${MEMORY:-1}" = 0 ] && exit 0
timeout 120 $BENCH --precisions half --impls ours,published --modes plain,sag --repeats 0 --slow_s 0 \
  --steps 2,2 --memory --json "$OUT/imagenet256_b16_memory.json" --markdown "$OUT/imagenet256_b16_memory.md" \
  2> "$OUT/imagenet256_b16_memory.log" | tail -n 12
