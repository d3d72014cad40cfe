"""Bench: a learned SINAREQ plan at the BitOps budget of uniform W4A4 (first/last at 8) against
uniform W4A4 DoReFa+PACT trained for the same epochs from the same FP32 checkpoint.

    python bench/learned_vs_uniform.py --preset cpu   # CIFAR-10 copy, 5k/2k subset, ~15 min on 2 cores
    python bench/learned_vs_uniform.py --preset gpu   # full CIFAR-10 copy, one GPU

Writes learned_vs_uniform.csv and the learned plan under --out; prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from cost_models import get_cost_model
from hwsearch.config import RunConfig
from hwsearch.costs import uniform_bits
from hwsearch.run import prepare, run

DATA = "imagefolder:../shared/data/cifar10-jpeg.tar.gz"
PRESETS = {
    "cpu": {"max_train": 5000, "max_test": 2000, "fp32_epochs": 15, "epochs": 6, "batch_size": 128},
    "gpu": {"fp32_epochs": 20, "epochs": 8, "batch_size": 256, "lr_fp32": 0.2, "lr": 0.04},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"model": args.model, "dataset": args.data, "seed": args.seed, **PRESETS[args.preset]}
    prep = prepare(RunConfig(**base))
    w, a = uniform_bits(prep.table, args.bits, args.bits)
    budget = get_cost_model("bitops")(prep.table, w, a)
    rows = []
    for label, cfg in (
        (f"uniform W{args.bits}A{args.bits} DoReFa", RunConfig(**base, fixed_bits=args.bits, lambda_w=0.0)),
        (f"uniform W{args.bits}A{args.bits} DoReFa + SINAREQ", RunConfig(**base, fixed_bits=args.bits)),
        ("learned (SINAREQ, BitOps budget)", RunConfig(**base, budgets={"bitops": budget})),
    ):
        t0 = time.time()
        res = run(cfg, out=out / f"lvu-{args.preset}-{label.split()[0]}-{'reg' if cfg.lambda_w else 'plain'}")
        plan = res.plan
        rows.append({"preset": args.preset, "run": label, "top1": res.metrics["top1"],
                     "fp32_top1": res.metrics["fp32_top1"], "bitops": plan["totals"]["bitops"],
                     "budget": budget, "avg_w_bits": plan["totals"]["avg_weight_bits"],
                     "avg_a_bits": sum(layer["act_bits"] for layer in plan["layers"]) / len(plan["layers"]),
                     "seconds": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / f"learned_vs_uniform_{args.preset}.csv", index=False)
    print(df.to_string(index=False))
    learned, uniform = df.iloc[2], df.iloc[0]
    print(f"\nlearned meets budget: {learned.bitops <= budget}; top-1 learned {learned.top1:.4f} "
          f"vs uniform {uniform.top1:.4f} ({100 * (learned.top1 - uniform.top1):+.2f} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
