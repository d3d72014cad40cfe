#!/bin/bash
# Two bench/step_time.py processes at once on the same cores (each with torch's default thread
# count), with the fused CPU kernel and with the ATen path (HWSEARCH_CPU_KERNELS=0): does the kernel
# suffer more than ATen's own operators when cores are oversubscribed (e.g. two search workers on one
# machine)? Writes OUT/contended_k{1,0}_{1,2}.json and .log.
#   bash bench/step_time_contended.sh [OUT]      (default bench/results/cpu-suite/step_time_contended)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/cpu-suite/step_time_contended}
PY=${PYTHON:-python}
mkdir -p "$OUT"
for K in 1 0; do
  for i in 1 2; do
    HWSEARCH_CPU_KERNELS=$K "$PY" bench/step_time.py --device cpu --modes qat,fp32 --steps 10 --repeats 3 \
      --out "$OUT/contended_k${K}_$i.json" > "$OUT/contended_k${K}_$i.log" 2>&1 &
  done
  wait
  echo "HWSEARCH_CPU_KERNELS=$K, two processes at once:"
  grep -h "ms/step" "$OUT"/contended_k"${K}"_*.log
done
