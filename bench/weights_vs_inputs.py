"""Bench: which bits does a layer need more after training, its weights' or its input's?

Every allocator hwsearch has (SINAREQ, the Hessian trace, the measured loss increase) gives weights
more bits than inputs; above W3A3 those plans lose to uniform bits. This asks the question
directly, with uniform plans that trade one for the other at (nearly) equal BitOps: W2A4 and W4A2
(8/9 of W3A3's BitOps for the free layers), W3A5 and W5A3 (15/16 of W4A4's), each trained exactly
like the uniform baselines of ``bench/learned_vs_uniform.py`` (same preset, same FP32 checkpoint,
``--lambda-w 0``), on the full CIFAR-10 test set. If inputs need the bits, W2A4 beats W4A2 (and
may match W3A3 at less cost).

    python bench/weights_vs_inputs.py [--seeds 0,1] [--out bench/results/resnet20-decisive/uniform-weights-vs-inputs]

One JSON file per finished run (a rerun skips them); ``weights_vs_inputs.json`` holds all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import code_version, write_json
from learned_vs_uniform import DATA, PRESETS

PAIRS = [(2, 4), (4, 2), (3, 5), (5, 3)]


def run_pair(w: int, a: int, seed: int, preset: dict, data: str, out: Path, threads: int | None) -> dict:
    import torch

    from hwsearch.config import RunConfig
    from hwsearch.run import run

    if threads:
        torch.set_num_threads(threads)
    key = f"W{w}A{a}-s{seed}"
    cfg = RunConfig(dataset=data, seed=seed, **preset["run"], fixed_bits=w, act_bits=a, lambda_w=0.0)
    t0 = time.time()
    result = run(cfg, out=out / "runs" / key)
    record = {"plan": f"W{w}A{a}", "weight_bits": w, "act_bits": a, "seed": seed, "top1": result.metrics["top1"],
              "plan_bitops": result.plan["totals"]["bitops"], "fp32_top1": result.metrics["fp32_top1"],
              "seconds": time.time() - t0}
    path = out / f"{key}.json"
    write_json(path, record)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--out", default="bench/results/resnet20-decisive/uniform-weights-vs-inputs")
    ap.add_argument("--workers", type=int, default=2, help="runs at once, sharing the cores (default 2)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(w, a, int(s)) for s in args.seeds.split(",") for w, a in PAIRS
            if not (out / f"W{w}A{a}-s{s}.json").exists()]
    print(f"{len(jobs)} runs to do", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.workers == 1:
        for job in jobs:
            run_pair(*job, preset, args.data, out, threads)
    elif jobs:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            for rec in pool.map(run_pair, *zip(*jobs), *[[x] * len(jobs) for x in (preset, args.data, out, threads)]):
                print(f"{rec['plan']} seed {rec['seed']}  top-1 {rec['top1']:.4f}  BitOps {rec['plan_bitops']:.4g}"
                      f"  ({rec['seconds']:.0f} s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("W*-s*.json"))]
    doc = {"preset": {"name": args.preset, **preset["run"], "dataset": args.data, "code": code_version(),
                      "command": f"python bench/weights_vs_inputs.py --seeds {args.seeds} --out {args.out}"},
           "rows": rows}
    write_json(out / "weights_vs_inputs.json", doc)
    for r in rows:
        print(f"{r['plan']:6s} seed {r['seed']}  top-1 {100 * r['top1']:.2f}  BitOps {r['plan_bitops']:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
