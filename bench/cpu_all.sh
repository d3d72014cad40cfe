#!/usr/bin/env bash
# The CPU preset of every bench, in an order that keeps timings clean (timed benches first,
# alone), then BENCHMARKS.md. About 4 hours on a 2-core machine (the decisive comparison and its
# search are most of it); each part resumes where it stopped.
#
#   bash bench/cpu_all.sh [RESULTS_DIR]        # default bench/results/cpu-suite
#   CIFAR=path/to/cifar10-jpeg.tar.gz           # default ../shared/data/cifar10-jpeg.tar.gz
#
# A search or evidence folder that exists is resumed, not redone: remove it to measure afresh.
set -u
PY=${PYTHON:-python3}
RES=${1:-bench/results/cpu-suite}
CIFAR=${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
$PY -c "import os, platform, torch; print(platform.processor() or platform.machine(), os.cpu_count(), 'cpus; torch', torch.__version__)" > "$RES/machine.txt"
stamp "step time"
$PY bench/step_time.py --device cpu --steps 20 --repeats 3 --out "$RES/step_time_cpu.json"
stamp "profile catalogue"
$PY bench/profile_catalogue.py --out "$RES" > "$RES/profile_catalogue.txt" 2>&1
stamp "16-trial search on digits"
$PY bench/search_bench.py --trials 16 --out "$RES/search-digits" > "$RES/search.log" 2>&1
stamp "lowest bits on digits, four seeds (two processes, one thread each)"
rm -f "$RES/low_bits_digits.jsonl"
$PY bench/lambda_sweep.py --digits 2:u:1 2:1:1 2:u:2 2:1:2 --out "$RES/low_bits_digits.jsonl" > /dev/null &
$PY bench/lambda_sweep.py --digits 2:u:3 2:1:3 2:u:4 2:1:4 --out "$RES/low_bits_digits.jsonl" > /dev/null
wait
stamp "evidence, CPU preset"
$PY bench/evidence.py --preset cpu --out "$RES/evidence-cpu" > "$RES/evidence.log" 2>&1
if [ -f "$CIFAR" ]; then
  stamp "8-trial search on the CIFAR-10 CPU preset"
  $PY bench/search_bench.py --dataset "imagefolder:$CIFAR" --trials 8 --out "$RES/search-cifar" \
      --max-train 2000 --max-test 1000 --fp32-epochs 10 --epochs 4 > "$RES/search-cifar.log" 2>&1
fi
if [ -f "$CIFAR" ]; then
  stamp "the decisive comparison: uniform, SINAREQ and Hessian plans at four budgets, three seeds"
  $PY bench/learned_vs_uniform.py --data "imagefolder:$CIFAR" --out "$RES" > "$RES/learned_vs_uniform.log" 2>&1
  stamp "a search on the decisive preset"
  $PY bench/search_bench.py --dataset "imagefolder:$CIFAR" --trials 8 --out "$RES/search-decisive" \
      --max-train 8000 --fp32-epochs 10 --fp32-seed 0 --epochs 4 --search-epochs 2 > "$RES/search-decisive.log" 2>&1
fi
$PY bench/report.py --results "$RES" --out "$RES/BENCHMARKS.md"
stamp done
