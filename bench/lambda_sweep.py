"""Bench: the regularizer strength λ_w in learned runs against uniform QAT, on the CPU preset's
CIFAR-10 subset (2,000 training images, 4 epochs, ResNet-20, DoReFa), one JSON line per run.

    python bench/lambda_sweep.py 3:10:0 3:1:0 3:u:0 ... [--out bench/results/cpu-suite/lambda_sweep.jsonl]

Each spec is BITS:LAMBDA:SEED: a learned run at the BitOps of uniform W<BITS>A<BITS> with
λ_w = LAMBDA, or with LAMBDA = u the uniform W<BITS>A<BITS> plain-QAT baseline (λ_w = 0). One
thread per process, so two processes can share 2 cores; results depend on the thread count
(these short runs are chaotic), so compare lines made the same way.

With ``--digits`` the runs use the bundled digits at the README's defaults (30 FP32 epochs,
30 quantized epochs, all 1,437 training images) instead:

    python bench/lambda_sweep.py --digits 2:u:1 2:1:1 ... --out bench/results/cpu-suite/low_bits_digits.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = "imagefolder:../shared/data/cifar10-jpeg.tar.gz"
BASE = {"model": "resnet20", "max_train": 2000, "max_test": 1000, "fp32_epochs": 10, "epochs": 4, "batch_size": 128}
DIGITS = {"model": "resnet20", "dataset": "digits", "fp32_epochs": 30, "epochs": 30, "batch_size": 128}


def main() -> int:
    import torch

    from cost_models import get_cost_model
    from hwsearch.config import RunConfig
    from hwsearch.costs import uniform_bits
    from hwsearch.run import prepare, run

    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="BITS:LAMBDA:SEED, LAMBDA=u for the uniform baseline")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--digits", action="store_true", help="the bundled digits at the README's defaults")
    ap.add_argument("--out", default="bench/results/cpu-suite/lambda_sweep.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = dict(DIGITS) if args.digits else {**BASE, "dataset": args.data}
    for spec in args.specs:
        b_text, lam_text, seed_text = spec.split(":")
        uniform = lam_text == "u"
        b, seed = int(b_text), int(seed_text)
        prep = prepare(RunConfig(**base, seed=seed))
        budget = get_cost_model("bitops")(prep.table, *uniform_bits(prep.table, b, b))
        config = (RunConfig(**base, seed=seed, fixed_bits=b, lambda_w=0.0) if uniform else
                  RunConfig(**base, seed=seed, budgets={"bitops": budget}, lambda_w=float(lam_text)))
        t0 = time.time()
        result = run(config)
        bits = [(layer["weight_bits"], layer["act_bits"]) for layer in result.plan["layers"]]
        line = {"bits": b, "lambda_w": "uniform" if uniform else float(lam_text), "seed": seed,
                "top1": result.metrics["top1"], "bitops_over_budget": result.plan["totals"]["bitops"] / budget,
                "layers_off_uniform": sum(1 for w, a in bits[1:-1] if (w, a) != (b, b)),
                "seconds": round(time.time() - t0, 1)}
        print(json.dumps(line), flush=True)
        with Path(args.out).open("a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
