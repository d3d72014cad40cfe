#!/usr/bin/env bash
# The full preset on one GPU as one prepared script (under 10 minutes on an H100/H200):
#   step, compiled   training-step time, eager and torch.compile'd (alone on the GPU)
#   fp32    the FP32 checkpoints the evidence jobs share
#   main    side by side: the evidence jobs (uniform baselines, fixed-bit claim, learned vs uniform;
#           seed 0; no job starts after --deadline-s) and a 3-worker CIFAR-10 search with its
#           hypervolume against the uniform baselines
# then BENCHMARKS.md for these results. PARTS selects parts (default: all).
#
#   bash bench/gpu_full.sh [RESULTS_DIR]                 # default bench/results/gpu-suite
#   PARTS="step search" CIFAR=path/to/cifar10-jpeg.tar.gz bash bench/gpu_full.sh
set -u
PY=${PYTHON:-python3}
RES=${1:-bench/results/gpu-suite}
PARTS=${PARTS:-"step compiled fp32 evidence search"}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export HWSEARCH_CACHE=${HWSEARCH_CACHE:-/tmp/hwsearch-cache}
DATA="imagefolder:${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$RES/gpu.txt"

if has step; then
  stamp "step time, eager (alone on the GPU)"
  timeout 90 $PY bench/step_time.py --device cuda --steps 30 --repeats 3 --out "$RES/step_time_cuda.json"
fi
if has compiled; then
  stamp "step time, torch.compile (alone on the GPU)"
  timeout 150 $PY bench/step_time.py --device cuda --steps 30 --repeats 3 --compile --modes fp32,sinareq \
      --out "$RES/step_time_cuda_compiled.json"
fi
if has fp32; then
  stamp "FP32 checkpoints (data decoded once)"
  timeout 150 $PY bench/evidence.py --preset gpu --seeds 0 --data "$DATA" --workers 2 --fp32-only \
      --out "$RES/evidence-gpu"
fi
stamp "evidence jobs and the search, side by side"
if has evidence; then
  timeout 280 $PY bench/evidence.py --preset gpu --seeds 0 --data "$DATA" --workers 8 --deadline-s 180 \
      --out "$RES/evidence-gpu" > "$RES/evidence.log" 2>&1 &
fi
if has search; then
  timeout ${SEARCH_TIMEOUT:-280} $PY bench/search_bench.py --dataset "$DATA" --trials 6 --workers 3 --out "$RES/search-cifar" \
      --epochs 4 --fp32-epochs 10 --batch-size 256 --lr-fp32 0.2 --lr 0.04 --compile > "$RES/search.log" 2>&1 &
fi
wait
stamp "report"
$PY bench/report.py --results "$RES" --out "$RES/BENCHMARKS.md"
stamp done
