#!/usr/bin/env bash
# The full preset on one GPU as one prepared script (about 9 minutes on an H100/H200):
# step-time ratios, the evidence tables (uniform baselines, the fixed-bit claim, learned vs
# uniform at W3A3/W4A4/W5A5; seed 0, more if time allows), and a 2-worker CIFAR-10 search
# with its hypervolume against the uniform baselines. Then BENCHMARKS.md for these results.
#
#   bash bench/gpu_full.sh [RESULTS_DIR]        # default bench/results/gpu
#   CIFAR=path/to/cifar10-jpeg.tar.gz bash bench/gpu_full.sh
set -u
PY=${PYTHON:-python3}
RES=${1:-bench/results/gpu}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export HWSEARCH_CACHE=${HWSEARCH_CACHE:-/tmp/hwsearch-cache}
DATA="imagefolder:${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RES/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$RES/gpu.txt"

stamp "step time (alone on the GPU)"
timeout 90 $PY bench/step_time.py --device cuda --steps 30 --repeats 3 --out "$RES/step_time_cuda.json"

stamp "FP32 checkpoints (data decoded once)"
timeout 150 $PY bench/evidence.py --preset gpu --seeds 0 --data "$DATA" --workers 2 --fp32-only \
    --out "$RES/evidence-gpu"

stamp "evidence jobs and the search, side by side"
timeout 280 $PY bench/evidence.py --preset gpu --seeds 0 --data "$DATA" --workers 6 --deadline-s 150 \
    --out "$RES/evidence-gpu" > "$RES/evidence.log" 2>&1 &
EV=$!
timeout 280 $PY bench/search_bench.py --dataset "$DATA" --trials 8 --workers 2 --out "$RES/search-cifar" \
    --epochs 6 --fp32-epochs 20 --batch-size 256 --lr-fp32 0.2 --lr 0.04 > "$RES/search.log" 2>&1 &
SE=$!
wait $EV; stamp "evidence exit $?"
wait $SE; stamp "search exit $?"
tail -5 "$RES/evidence.log" "$RES/search.log"
$PY bench/report.py --results "$RES" --out "$RES/BENCHMARKS.md"
stamp done
