"""Bench: training-step time of FP32, uniform QAT (DoReFa+PACT, fixed 4 bits) and SINAREQ
(learning bits under a BitOps budget) on ResNet-20, batch 128, 32x32 inputs.

    python bench/step_time.py [--device cpu|cuda] [--steps 20] [--data imagefolder:../shared/data/cifar10-jpeg.tar.gz]

Synthetic uint8 images are used (the step time does not depend on pixel values). Prints ms/step,
the ratios to FP32, and the operator calls per training step of each mode: every ATen operator
dispatched in one epoch of ``--steps`` steps (forward, backward, optimizers, projection), counted
with a TorchDispatchMode on an untimed pass, divided by the steps (a fused kernel such as
``hwsearch::pact_forward`` is one call). The modes are timed round-robin, ``--repeats`` rounds, and
each keeps its best epoch. ``HWSEARCH_CPU_KERNELS=0`` measures the ATen path instead of the fused
CPU kernel. With ``--compile`` each mode's whole training step is one compiled graph (a CUDA graph on
a GPU); each mode then trains 1 + ``--repeats`` epochs in one run, the first (compilation) dropped,
the others timed from the run's history, and the best kept; operator calls are not counted.
"""

from __future__ import annotations

import argparse
import time

import torch

from hwsearch.config import RunConfig
from hwsearch.costs import uniform_bits
from hwsearch.data import TensorData
from hwsearch.learn import Prepared, calibrate, learn_bits, quantize_prepared
from hwsearch.rounding import BitSpace
from hwsearch.run import fit_plan, quantize_plan
from hwsearch.train import fit


def synthetic(n: int, device) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorData("synthetic", x, y, x[:256], y[:256], 10, (0.5,) * 3, (0.25,) * 3).to(device)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make(mode: str, data: TensorData, device, steps: int) -> tuple[Prepared, dict | None]:
    from cost_models import get_cost_model, profile
    from hwsearch.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20").to(device)
    table = profile(model, data.input_shape)
    n = len(table)
    cfg = RunConfig(model="resnet20", dataset="synthetic", epochs=1, batch_size=128, freeze_at=1.0,
                    fixed_bits=4 if mode == "qat" else None)
    free = [0 < i < n - 1 for i in range(n)]
    w = [8.0] * n if mode == "sinareq" else [4.0] * n
    a = list(w)
    w[0] = a[0] = w[-1] = a[-1] = 8.0
    space = BitSpace(free if mode == "sinareq" else [False] * n, free if mode == "sinareq" else [False] * n)
    if mode == "sinareq":
        wb, ab = uniform_bits(table, 4, 4)
        cfg = RunConfig(**{**cfg.to_dict(), "budgets": {"bitops": get_cost_model("bitops")(table, wb, ab)}})
    prep = Prepared(cfg, data, model, table, table.names, space, w, a, device)
    return prep, None


class _CountOps:
    """Counts every ATen operator call that reaches the Python dispatcher (backward included)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.calls += 1
                return func(*args, **(kwargs or {}))

        self.calls = 0
        self.mode = Mode()


def ops_per_step(step, steps: int) -> float:
    counter = _CountOps()
    with counter.mode:
        step()
    return counter.calls / steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--compile", action="store_true", help="torch.compile every mode (compile time is not timed)")
    ap.add_argument("--modes", default="fp32,qat,sinareq")
    args = ap.parse_args()
    device = torch.device(args.device)
    data = synthetic(128 * args.steps, device)
    modes = args.modes.split(",")
    steps = {}
    compiled_times: dict[str, list[float]] = {}
    first_epoch: dict[str, float] = {}  # --compile: seconds to compile and run the first epoch
    for mode in modes:
        prep, _ = make(mode, data, device, args.steps)
        if args.compile:
            from dataclasses import replace

            # One fit of 1 + repeats epochs per mode: each fit compiles its step afresh, so the first
            # epoch (compilation) is dropped and the others are timed from the fit's history.
            prep.config = replace(prep.config, compile=True, epochs=1 + args.repeats)
        epochs, layers = prep.config.epochs, None
        if mode == "qat":
            layers = quantize_plan(prep.model, prep.data, prep.table, [int(b) for b in prep.w_init],
                                   [int(b) for b in prep.a_init], config=prep.config)
        elif mode == "sinareq":
            layers = quantize_prepared(prep, prep.w_init, prep.a_init, freeze=False)
            calibrate(prep.model, prep.data, 128)

        def step(prep=prep, mode=mode, epochs=epochs, layers=layers):
            history: list[dict] = []
            if mode == "fp32":
                fit(prep.model, prep.data, epochs=epochs, lr=0.05, batch_size=128, seed=0, compile=args.compile,
                    history=history, log_every=args.steps)
            elif mode == "qat":
                fit_plan(prep.model, prep.data, layers, config=prep.config, history=history)
            else:
                learn_bits(prep, layers, epochs=epochs, history=history)
            return history

        if args.compile:
            rows = [r for r in step() if "seconds" in r]
            compiled_times[mode] = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
                                    for a, b in zip(rows, rows[1:]) if a["step"] >= args.steps]
            if not compiled_times[mode]:
                raise SystemExit("step_time: --compile times the steps between logging points (every 20 steps): "
                                 "give --steps 20 or more")
            first_epoch[mode] = next(r["seconds"] for r in rows if r["step"] >= args.steps)
            print(f"{mode}: first epoch (compilation included) {first_epoch[mode]:.0f} s", flush=True)
            continue
        step()  # warm-up (the fused CPU kernel's build)
        steps[mode] = step
    # Round-robin over the modes, repeat after repeat: whichever mode ran first in a process used to
    # pay for the process's warm-up (FP32 first: 310-315 ms against 268 ms run after the others), and
    # the machine's speed drifts; interleaving gives every mode the same conditions. Best repeat kept.
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats if not args.compile else 0):
        for mode in modes:
            times[mode].append(timed(steps[mode], device) / args.steps)
    times.update(compiled_times)
    results = {mode: min(t) for mode, t in times.items()}
    ops = {mode: ops_per_step(steps[mode], args.steps) if not args.compile else None for mode in modes}
    for mode in modes:
        print(f"{mode:8s} {1000 * results[mode]:8.2f} ms/step  (runs: {', '.join(f'{1000 * t:.1f}' for t in times[mode])})"
              + (f"  {ops[mode]:.0f} operator calls/step" if ops[mode] is not None else ""), flush=True)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    ratios = {f"{m}_ratio": results[m] / results["fp32"] for m in results if m != "fp32" and "fp32" in results}
    for k, v in ratios.items():
        print(f"{k} = {v:.2f}")
    if args.out:
        import json
        from pathlib import Path

        name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": 128,
                                             "compiled": args.compile,
                                             "ms_per_step": {k: 1000 * v for k, v in results.items()},
                                             "ms_per_step_each_repeat": {k: [1000 * t for t in v]
                                                                         for k, v in times.items()},
                                             "ops_per_step": ops, **ratios,
                                             **({"first_epoch_s": first_epoch} if args.compile else {})},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
