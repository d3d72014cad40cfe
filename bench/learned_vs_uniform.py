"""Bench: do chosen plans beat uniform bits at the same BitOps? The decisive comparison.

At the BitOps of uniform W3A3 and W4A4 (first/last layer at 8 bits), and at the geometric means
of W2A2/W3A3 and W3A3/W4A4 where no uniform plan exists, it runs for every seed:

- ``uniform``: uniform W2A2, W3A3, W4A4 (plain DoReFa + PACT QAT, ``--bits B --lambda-w 0``);
- ``sinareq``: SINAREQ chooses the plan, which is then trained like uniform (``hwsearch run``);
- ``hessian``: the Hessian-trace allocator chooses it (``hwsearch run --allocator hessian``);
- ``measured``: the same integer program on each layer's measured loss increase (``--allocator measured``);

every plan trained for the same epochs from the seed's FP32 checkpoint and tested on the whole
10,000-image CIFAR-10 test set. At the intermediate budgets the uniform value is interpolated
linearly in log-BitOps between its neighbours, per seed (rows ``uniform-interp``).

    python bench/learned_vs_uniform.py                       # the CPU preset (2 cores, < 2 hours)
    python bench/learned_vs_uniform.py --preset gpu          # full training set, one GPU
    python bench/report.py                                   # BENCHMARKS.md from the results

Each finished run writes one JSON file under ``--out/runs-<preset>/``; a rerun skips those, so an
interrupted bench resumes with the same command. The table is (re)written after every run to
``--out/learned_vs_uniform.json`` (``-<preset>`` added for presets other than cpu).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from common import code_version, write_json

DATA = "imagefolder:../shared/data/cifar10-jpeg.tar.gz"
UNIFORM = {"W2A2": 2, "W3A3": 3, "W4A4": 4}
PRESETS = {
    # 2 cores: an 8,000-image training subset, the full test set, one FP32 checkpoint (fp32_seed 0)
    # that every seed's runs start from, so that seeds differ only in the quantized training.
    # Uniform W3A3's spread over seeds 0-2 from that checkpoint: 0.10 points (bench/results/resnet20-decisive/sinareq).
    "cpu": {"run": {"max_train": 8000, "fp32_epochs": 10, "fp32_seed": 0, "epochs": 4, "search_epochs": 2,
                    "batch_size": 128},
            "seeds": [0, 1, 2], "workers": 2},
    "gpu": {"run": {"fp32_epochs": 15, "epochs": 6, "batch_size": 256, "lr_fp32": 0.2, "lr": 0.04, "compile": True},
            "seeds": [0, 1, 2]},
    "smoke": {"run": {"max_train": 256, "max_test": 256, "fp32_epochs": 1, "epochs": 1, "batch_size": 64},
              "memory_budgets": True, "seeds": [0]},
    # MobileNetV2 for 32x32 (depthwise layers), the cpu preset's data and plan training; its FP32 checkpoint
    # trained to convergence on the subset (40 epochs; 10 left four more epochs at 4 bits above FP32), and
    # uniform W8A8 beside FP32 to show it (within 0.3 points).
    "mobilenet-cpu": {"run": {"model": "mobilenet_v2_cifar", "max_train": 8000, "fp32_epochs": 40, "fp32_seed": 0,
                              "epochs": 4, "search_epochs": 2, "batch_size": 128},
                      "uniform": {"W8A8": 8, "W4A4": 4, "W3A3": 3, "W2A2": 2}, "memory_budgets": True,
                      "seeds": [0, 1, 2], "workers": 1},
    # The comparison itself on 2 cores: mobilenet-cpu's data and FP32 checkpoint, plans trained 2 epochs
    # (4 would take ~8 hours for the table), the budgets issue 26 names.
    "mobilenet-cpu-2ep": {"run": {"model": "mobilenet_v2_cifar", "max_train": 8000, "fp32_epochs": 40,
                                  "fp32_seed": 0, "epochs": 2, "search_epochs": 2, "batch_size": 128},
                          # W3A2 and W2A3: uniform plans under the W2.5A2.5 budget (6 bit products per MAC
                          # against 6.25), the uniform baselines that fit it, beside the interpolation
                          "uniform": {**UNIFORM, "W3A2": (3, 2), "W2A3": (2, 3)},
                          "budgets": ["W2.5A2.5", "W3A3", "W4A4"], "memory_budgets": True,
                          "seeds": [0, 1, 2], "workers": 1},
}
BUDGETS = ["W2.5A2.5", "W3A3", "W3.5A3.5", "W4A4"]
BETWEEN = {"W2.5A2.5": ("W2A2", "W3A3"), "W3.5A3.5": ("W3A3", "W4A4")}
# Uniform plans of unequal weight and activation bits that fit under a budget (a preset's "uniform" may
# list them): with --budgets, they run beside the interpolation's ends, as that budget's comparison needs.
UNDER = {"W2.5A2.5": ("W3A2", "W2A3")}
ALLOCATORS = ["sinareq", "hessian", "measured"]
# Weight-memory budgets (--budget-memory): the weight memory of uniform W<b> (first/last at 8), every plan's
# activations at 8 bits, the weights' bits chosen under the memory cap (bit pressure on memory too); the
# uniform plan at that memory is W<b>A8.
MEMORY = {"W3-memory": 3}


def budgets_bitops(table) -> dict[str, float]:
    """BitOps of uniform W2A2..W4A4 and W8A8 (first/last at 8) and the geometric means between them."""
    from cost_models import get_cost_model
    from hwsearch.costs import uniform_bits

    bitops = get_cost_model("bitops")
    out = {name: bitops(table, *uniform_bits(table, b, b)) for name, b in {**UNIFORM, "W8A8": 8}.items()}
    for name, (lo, hi) in BETWEEN.items():
        out[name] = math.sqrt(out[lo] * out[hi])
    return out


def job_list(preset: dict) -> list[dict]:
    """Seed by seed: uniform first (the interpolation needs it), then both allocators at each budget."""
    jobs = []
    for seed in preset["seeds"]:
        for name, b in preset.get("uniform", UNIFORM).items():
            w, a = b if isinstance(b, tuple) else (b, None)  # (weight bits, activation bits) or one for both
            jobs.append({"key": f"uniform-{name}-s{seed}", "allocator": "uniform", "budget": name, "seed": seed,
                         "config": {"fixed_bits": w, "lambda_w": 0.0, **({"act_bits": a} if a else {})}})
        for budget in preset.get("budgets", BUDGETS):
            for alloc in ALLOCATORS:
                jobs.append({"key": f"{alloc}-{budget}-s{seed}", "allocator": alloc, "budget": budget, "seed": seed,
                             "config": {"allocator": alloc}})
        for budget, b in (MEMORY.items() if preset.get("memory_budgets") else ()):
            jobs.append({"key": f"uniform-{budget}-s{seed}", "allocator": "uniform", "budget": budget, "seed": seed,
                         "config": {"fixed_bits": b, "act_bits": 8, "lambda_w": 0.0}})
            for alloc in ALLOCATORS:
                jobs.append({"key": f"{alloc}-{budget}-s{seed}", "allocator": alloc, "budget": budget, "seed": seed,
                             "config": {"allocator": alloc, "act_bits": 8, "cost_model": "memory"}})
    return jobs


def budget_of(table, name: str) -> tuple[str, float | None]:
    """The cost model and cap of a named budget: BitOps of a uniform plan (or between two), or the weight
    memory of uniform W<b>; ("bitops", None) for a name that is no budget (a uniform plan such as W3A2)."""
    from cost_models import get_cost_model
    from hwsearch.costs import uniform_bits

    if name in MEMORY:
        return "memory", get_cost_model("memory")(table, *uniform_bits(table, MEMORY[name], 8))
    return "bitops", budgets_bitops(table).get(name)


def run_job(job: dict, preset: dict, data: str, out: Path, threads: int | None = None) -> dict:
    import torch

    from hwsearch.config import RunConfig
    from hwsearch.run import prepare, run

    if threads:
        torch.set_num_threads(threads)

    base = {"dataset": data, "seed": job["seed"], **preset["run"]}
    prep = prepare(RunConfig(**base))  # the data, loaded once: run() reads the same object
    kind, cap = budget_of(prep.table, job["budget"])
    cfg = RunConfig(**{**base, **job["config"]}, budgets={} if job["allocator"] == "uniform" else {kind: cap})
    t0 = time.time()
    result = run(cfg, data=prep.data, out=out / "runs" / job["key"])
    bitops = cap if kind == "bitops" and cap is not None else result.plan["totals"]["bitops"]  # else: its own
    record = {"budget": job["budget"], "bitops": bitops, "allocator": job["allocator"], "seed": job["seed"],
              **({"memory": cap, "plan_memory": result.plan["totals"]["weight_bytes"]} if kind == "memory" else {}),
              "top1": result.metrics["top1"], "plan_bitops": result.plan["totals"]["bitops"],
              "fp32_top1": result.metrics["fp32_top1"], "search_top1": result.metrics.get("search_top1"),
              "seconds": time.time() - t0,
              "bits": [[layer["name"], layer["weight_bits"], layer["act_bits"]] for layer in result.plan["layers"]]}
    path = out / f"{job['key']}.json"
    write_json(path, record)
    return record


def table_rows(records: list[dict]) -> list[dict]:
    """The finished runs as rows, plus the interpolated uniform value at each intermediate budget and seed."""
    keep = ("budget", "bitops", "allocator", "seed", "top1", "plan_bitops", "search_top1", "fp32_top1", "seconds",
            "memory", "plan_memory")
    rows = [{k: r.get(k) for k in keep} for r in records]
    uniform = {(r["budget"], r["seed"]): r for r in records if r["allocator"] == "uniform"}
    for name, (lo, hi) in BETWEEN.items():
        if not any(r["budget"] == name for r in records):  # no plan at that budget: nothing to compare
            continue
        for seed in sorted({r["seed"] for r in records}):
            a, b = uniform.get((lo, seed)), uniform.get((hi, seed))
            if not (a and b):
                continue
            target = math.sqrt(a["bitops"] * b["bitops"])
            f = (math.log(target) - math.log(a["bitops"])) / (math.log(b["bitops"]) - math.log(a["bitops"]))
            rows.append({"budget": name, "bitops": target, "allocator": "uniform-interp", "seed": seed,
                         "top1": a["top1"] + f * (b["top1"] - a["top1"]), "plan_bitops": None})
    order = {b: i for i, b in enumerate(["W2A2", *BUDGETS, "W8A8", *MEMORY])}
    return sorted(rows, key=lambda r: (order.get(r["budget"], 99), r["allocator"], r["seed"]))


def write_table(out: Path, table_path: Path, preset_name: str, preset: dict, data: str) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    doc = {"preset": {"name": preset_name, **preset["run"], **({"allocator_overrides": preset["allocator_overrides"]}
                                                               if "allocator_overrides" in preset else {}),
                      "dataset": data, "seeds": preset["seeds"],
                      "test_images": "all" if not preset["run"].get("max_test") else preset["run"]["max_test"],
                      "command": preset.get("command", f"python bench/learned_vs_uniform.py --preset {preset_name}"),
                      "code": code_version()},
           "rows": table_rows(records)}
    write_json(table_path, doc)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--seeds", help="comma-separated seeds instead of the preset's")
    ap.add_argument("--only", help="comma-separated allocators to run (uniform, sinareq, hessian, measured)")
    ap.add_argument("--budgets", help=f"comma-separated budgets for the allocators (default all: {','.join(BUDGETS)}); "
                                      "uniform runs only at the budgets these are compared with")
    ap.add_argument("--out", default="bench/results/cpu-suite", help="results folder (default bench/results/cpu-suite)")
    ap.add_argument("--workers", type=int, help="runs at once, processes sharing the cores (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch threads of a single worker (default: torch's; with "
                                                "--workers N, cores/N each)")
    ap.add_argument("--deadline-s", type=float, default=float("inf"), help="start no run after this many seconds")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a RunConfig field for the allocators' runs (not uniform's), e.g. beta_update=shared; "
                         "repeatable; recorded in the table's preset")
    args = ap.parse_args()
    preset = dict(PRESETS[args.preset], command=" ".join(["python bench/learned_vs_uniform.py", *sys.argv[1:]]))
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    if overrides:
        from hwsearch.config import RunConfig

        try:
            RunConfig(**overrides)
        except (TypeError, ValueError) as exc:
            ap.error(f"--set: {exc}")
        preset["allocator_overrides"] = overrides
    if args.seeds:
        preset["seeds"] = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    runs = out / f"learned_vs_uniform-runs-{args.preset}"
    runs.mkdir(parents=True, exist_ok=True)
    table_path = out / ("learned_vs_uniform.json" if args.preset == "cpu" else f"learned_vs_uniform-{args.preset}.json")
    args.workers = args.workers or preset.get("workers", 1)
    jobs = job_list(preset)
    for job in jobs:
        if job["allocator"] != "uniform":
            job["config"].update(overrides)
    if args.only:
        jobs = [j for j in jobs if j["allocator"] in args.only.split(",")]
    if args.budgets:
        unknown = set(args.budgets.split(",")) - set(BUDGETS) - set(MEMORY)
        if unknown:
            ap.error(f"--budgets: unknown {', '.join(sorted(unknown))} (choose from {', '.join([*BUDGETS, *MEMORY])})")
        chosen = args.budgets.split(",")
        needed = {u for b in chosen for u in (*BETWEEN.get(b, (b,)), *UNDER.get(b, ()))}  # what their comparison needs
        jobs = [j for j in jobs if j["budget"] in (needed if j["allocator"] == "uniform" else chosen)]
    todo = [j for j in jobs if not (runs / f"{j['key']}.json").exists()]
    print(f"{len(jobs)} runs, {len(todo)} to do", flush=True)
    t0 = time.time()

    def report(rec: dict) -> None:
        write_table(runs, table_path, args.preset, preset, args.data)
        cost = (f"memory {rec['plan_memory']:.4g} of {rec['memory']:.4g} B" if "memory" in rec else
                f"BitOps {rec['plan_bitops']:.4g} of {rec['bitops']:.4g}")
        print(f"{rec['allocator']:8s} {rec['budget']:9s} seed {rec['seed']}  top-1 {rec['top1']:.4f}  {cost}  "
              f"({rec['seconds']:.0f} s, t={time.time() - t0:.0f} s)", flush=True)

    if todo and args.workers == 1:
        for job in todo:
            if time.time() - t0 > args.deadline_s:
                break
            report(run_job(job, preset, args.data, runs, args.threads))
    elif todo:
        import multiprocessing as mp
        import signal
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        def stop(signum, frame):  # a killed bench takes its runs with it (they would go on, orphaned)
            for child in mp.active_children():
                child.terminate()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        report(run_job(todo[0], preset, args.data, runs))  # alone: it trains the shared FP32 checkpoint
        queue = todo[1:]
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            pending: set = set()
            while queue or pending:
                while queue and len(pending) < args.workers and time.time() - t0 <= args.deadline_s:
                    pending.add(pool.submit(run_job, queue.pop(0), preset, args.data, runs, threads))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    report(fut.result())
    doc = write_table(runs, table_path, args.preset, preset, args.data)
    left = len([j for j in jobs if not (runs / f"{j['key']}.json").exists()])
    print(f"{len(doc['rows'])} rows in {table_path}; {left} runs left" + (" (same command resumes)" if left else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
