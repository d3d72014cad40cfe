#!/usr/bin/env bash
# The CPU preset of every bench, in an order that keeps timings clean (timed benches first,
# alone), then BENCHMARKS.md. About 40 minutes on a 2-core machine.
#
#   bash bench/cpu_all.sh [RESULTS_DIR]        # default bench/results/cpu
set -u
PY=${PYTHON:-python3}
RES=${1:-bench/results/cpu}
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
stamp "evidence, CPU preset"
$PY bench/evidence.py --preset cpu --out "$RES/evidence-cpu" > "$RES/evidence.log" 2>&1
$PY bench/report.py --results "$RES" --out "$RES/BENCHMARKS.md"
stamp done
