"""Bench: a whole search, timed, with its front's hypervolume against the uniform baselines'.

    python bench/search_bench.py                                   # 16 trials on digits (CPU)
    python bench/search_bench.py --dataset imagefolder:../shared/data/cifar10-jpeg.tar.gz \\
        --trials 8 --workers 2 --epochs 6 --fp32-epochs 20 --batch-size 256 --lr-fp32 0.2 --lr 0.04  # GPU

With --workers N, N worker processes share one SQLite study (the distributed path on one
machine), each with cores/N threads (OMP_NUM_THREADS, unless set). Prints wall time, trials/hour, both hypervolumes (same reference point: top-1 0 and
the uniform W8A8 cost; same epochs per point) and their ratio; writes search_bench_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="bench/results/search-digits")
    args, passthrough = ap.parse_known_args()  # any other option goes to `hwsearch search`
    out = Path(args.out)
    cmd = [sys.executable, "-m", "hwsearch", "search", "--model", args.model, "--dataset", args.dataset,
           "--trials", str(args.trials), "--out", str(out), "--quiet", "--heartbeat", "5", "--grace", "60",
           *passthrough]
    # Each worker gets its share of the cores: at torch's default (all cores each), N workers
    # oversubscribe the CPU and every step runs several times slower (bench/step_time_contended.sh).
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    t0 = time.time()
    # Workers share the study in out/study.db; whichever claims the lock first computes the baselines.
    procs = [subprocess.Popen(cmd, env=env) for _ in range(args.workers)]
    # A SIGTERM to this script (kill, pkill) ends its workers too: left running, an orphaned worker
    # keeps training on its study and skews the next measurement's wall time.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    if any(codes):
        print(f"workers exited {codes}", file=sys.stderr)
        return 1
    seconds = time.time() - t0
    summary = json.loads((out / "front.json").read_text())
    hv, base = summary["hypervolume"], summary["baseline_hypervolume"]
    result = {"dataset": args.dataset, "model": args.model, "trials": summary["completed"], "workers": args.workers,
              "seconds": seconds, "trials_per_hour": 3600 * summary["completed"] / seconds,
              "hypervolume": hv, "baseline_hypervolume": base, "ratio": hv / base if base else None,
              "reference_point": summary["reference_point"], "front_size": summary["front_size"],
              "options": passthrough}
    name = out.name
    (out.parent / f"search_bench_{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
