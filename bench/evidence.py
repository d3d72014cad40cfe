"""Bench: the evidence tables (uniform baselines, the paper's fixed-bit claim, learned against
uniform bits at equal BitOps), each run through the same training code from the same FP32
checkpoint, as a resumable job list run by parallel worker processes.

    python bench/evidence.py --preset cpu                 # 2-core CPU, under 30 minutes
    python bench/evidence.py --preset gpu --workers 6     # one GPU (small jobs share it well)
    python bench/report.py                                # BENCHMARKS.md from the results

Each finished job writes one JSON file under --out; a rerun skips those, so a run cut short by
--deadline-s (no new job starts after it) is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from common import code_version

DATA = "imagefolder:../shared/data/cifar10-jpeg.tar.gz"
PRESETS = {
    # CPU: every table at seed 0; seeds 1 and 2 repeat only the 4-bit rows (claim and learned vs
    # uniform), which is what fits 30 minutes on 2 cores and still shows the seed spread.
    "cpu": {"run": {"max_train": 2000, "max_test": 1000, "fp32_epochs": 10, "epochs": 4, "batch_size": 128},
            "models": ["resnet20"], "seeds": [0, 1, 2], "workers": 1, "later_seed_bits": [4]},
    # GPU: torch.compile'd steps (3.3x faster than eager on an H200) and 8 jobs sharing the GPU, so
    # that seed 0's 31 jobs fit bench/gpu_full.sh's 10 minutes (eager at 8 epochs did 9 of 31).
    "gpu": {"run": {"fp32_epochs": 20, "epochs": 6, "batch_size": 256, "lr_fp32": 0.2, "lr": 0.04, "compile": True},
            "models": ["resnet20", "vgg11_bn"], "seeds": [0, 1, 2], "workers": 8},
    "smoke": {"run": {"max_train": 256, "max_test": 128, "fp32_epochs": 1, "epochs": 1, "batch_size": 64},
              "models": ["resnet20"], "seeds": [0], "workers": 1},
}
UNIFORM_BITS = (2, 3, 4, 5, 8)
CLAIM_BITS = (3, 4, 5)
LEARNED_BITS = (3, 4, 5)


def job_list(preset: dict, data: str) -> list[dict]:
    """Every run, keyed so that a run two tables need is run once. Seed 0 first."""
    base = {"dataset": data, **preset["run"]}
    jobs: dict[str, dict] = {}

    def add(table: str, key: str, **cfg) -> None:
        entry = jobs.setdefault(key, {"key": key, "tables": [], "config": {**base, **cfg}})
        entry["tables"].append(table)

    for seed in preset["seeds"]:
        first = seed == preset["seeds"][0]
        keep = None if first else preset.get("later_seed_bits")

        def bits_now(bits: tuple[int, ...], keep=keep) -> list[int]:
            return [b for b in bits if keep is None or b in keep]

        if first:
            for q in ("dorefa", "wrpn"):
                for b in UNIFORM_BITS:
                    add("uniform", f"resnet20-{q}-w{b}-plain-s{seed}", model="resnet20", quantizer=q, fixed_bits=b,
                        lambda_w=0.0, seed=seed)
        for b in bits_now(LEARNED_BITS):
            # Learned at the BitOps of uniform WbAb, next to uniform DoReFa WbAb (the claim's plain row).
            add("learned", f"resnet20-dorefa-learned-w{b}a{b}-s{seed}", model="resnet20", quantizer="dorefa",
                seed=seed, budget_from_bits=b)
            if not first:
                add("learned", f"resnet20-dorefa-w{b}-plain-s{seed}", model="resnet20", quantizer="dorefa",
                    fixed_bits=b, lambda_w=0.0, seed=seed)
        for model in preset["models"]:
            for q in ("dorefa", "wrpn"):
                for b in bits_now(CLAIM_BITS):
                    for reg, lam in (("plain", 0.0), ("sinareq", None)):
                        extra = {"lambda_w": lam} if lam is not None else {}
                        add("claim", f"{model}-{q}-w{b}-{reg}-s{seed}", model=model, quantizer=q, fixed_bits=b,
                            seed=seed, **extra)
    def priority(job: dict) -> tuple:
        c, key = job["config"], job["key"]
        bits = c.get("fixed_bits") or c.get("budget_from_bits")
        rank = (0 if "learned" in key or (c["quantizer"] == "dorefa" and "plain" in key and bits in LEARNED_BITS
                                          and c["model"] == "resnet20")
                else 1 if c["model"] == "resnet20" and bits in CLAIM_BITS else 2 if c["model"] == "resnet20" else 3)
        return (c["seed"], rank, abs((bits or 4) - 4))

    return sorted(jobs.values(), key=priority)


def _run_job(job: dict, out: str, threads: int) -> dict:
    import torch

    from cost_models import get_cost_model
    from hwsearch.config import RunConfig
    from hwsearch.costs import uniform_bits
    from hwsearch.run import prepare, run

    torch.set_num_threads(threads)
    cfg = dict(job["config"])
    bits = cfg.pop("budget_from_bits", None)
    t0 = time.time()
    if bits is not None:
        prep = prepare(RunConfig(**cfg))
        w, a = uniform_bits(prep.table, bits, bits)
        cfg["budgets"] = {"bitops": get_cost_model("bitops")(prep.table, w, a)}
    config = RunConfig(**cfg)
    result = run(config, out=Path(out) / "runs" / job["key"])
    record = {"key": job["key"], "tables": job["tables"], "config": config.to_dict(), "metrics": result.metrics,
              "plan_totals": result.plan["totals"],
              "bits": [[layer["name"], layer["weight_bits"], layer["act_bits"]] for layer in result.plan["layers"]],
              "seconds": time.time() - t0, "device": str(torch.cuda.get_device_name() if torch.cuda.is_available()
                                                       else "cpu")}
    path = Path(out) / f"{job['key']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)
    return record


def _fp32(model: str, seed: int, preset: dict, data: str, threads: int) -> float:
    import torch

    from hwsearch.config import RunConfig
    from hwsearch.run import prepare
    from hwsearch.train import fp32_checkpoint

    torch.set_num_threads(threads)
    cfg = RunConfig(model=model, dataset=data, seed=seed, **preset["run"])
    prep = prepare(cfg)
    return fp32_checkpoint(model, prep.model, prep.data, epochs=cfg.fp32_epochs, seed=seed, lr=cfg.lr_fp32,
                           batch_size=cfg.batch_size)["top1"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--deadline-s", type=float, default=float("inf"), help="start no job after this many seconds")
    ap.add_argument("--out", help="default bench/results/evidence-<preset>")
    ap.add_argument("--fp32-only", action="store_true", help="train the FP32 checkpoints and stop")
    ap.add_argument("--seeds", help="comma-separated seeds instead of the preset's")
    args = ap.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.seeds:
        preset["seeds"] = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or f"bench/results/evidence-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or preset["workers"]
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = job_list(preset, args.data)
    todo = [j for j in jobs if not (out / f"{j['key']}.json").exists()]
    (out / "preset.json").write_text(json.dumps({"preset": args.preset, **preset, "data": args.data,
                                                 "code": code_version(),
                                                 "jobs": len(jobs), "workers": workers}, indent=1))
    print(f"{len(jobs)} jobs, {len(todo)} to run, {workers} workers", flush=True)
    t0 = time.time()
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        needed = sorted({(j["config"]["model"], j["config"]["seed"]) for j in todo}, key=lambda x: (x[1], x[0]))
        for (model, seed), fut in [(k, pool.submit(_fp32, *k, preset, args.data, threads)) for k in needed]:
            print(f"fp32 {model} seed {seed}: top-1 {fut.result():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if args.fp32_only:
            return 0
        pending, queue = set(), list(todo)
        while queue or pending:
            while queue and len(pending) < workers and time.time() - t0 < args.deadline_s:
                pending.add(pool.submit(_run_job, queue.pop(0), str(out), threads))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    rec = fut.result()
                    print(f"{rec['key']:40s} top-1 {rec['metrics']['top1']:.4f} ({rec['seconds']:.0f}s, "
                          f"t={time.time() - t0:.0f}s)", flush=True)
                except Exception as exc:  # a failed job is reported; the others go on
                    print(f"job failed: {type(exc).__name__}: {exc}", flush=True)
    left = [j["key"] for j in jobs if not (out / f"{j['key']}.json").exists()]
    print(f"finished in {time.time() - t0:.0f}s; {len(jobs) - len(left)}/{len(jobs)} jobs done"
          + (f"; not run (deadline): {len(left)}" if left else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
