"""CLI handlers for the training commands: run and apply."""

from __future__ import annotations

import sys
from pathlib import Path

from cost_models import get_cost_model

from .cli_args import (
    add_run_arguments,
    bits,
    config_from_args,
    default_out,
    format_float_layers,
    positive_int,
)
from .units import format_si


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _cmd_run(args) -> int:
    from .run import run
    from .train import NonFiniteLoss

    config = config_from_args(args, fixed_bits=args.bits)
    out = Path(args.out) if args.out else default_out("run", args)
    if (out / "plan.json").exists():
        raise ValueError(f"--out: {out} already holds a plan; choose another directory")
    try:
        result = run(config, out=out, progress=not args.quiet)
    except NonFiniteLoss as exc:
        print(f"hwsearch: training stopped: {exc}; no plan was written ({out}/metrics.json)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hwsearch: interrupted; no plan was written; status in {out}/metrics.json", file=sys.stderr)
        return 130
    from . import dist

    if not dist.is_main():  # under torchrun rank 0 reports
        return 0
    m, plan = result.metrics, result.plan
    totals = plan["totals"]
    name = "top-1" if m["metric"] == "top1" else m["metric"]
    given = ("  (your weights, as given)" if config.weights else
             "  (cached FP32 checkpoint)" if m.get("fp32_cached") else
             f"  (FP32 checkpoint trained now, {_epochs(config.fp32_epochs)}, and cached)")
    print(f"{'FP32 ' + name:<14} {m['fp32_top1']:.4f}{given}")
    if "search_top1" in m:
        print(f"{'search ' + name:<14} {m['search_top1']:.4f}  (end of bit learning, {_epochs(config.learning_epochs)})")
    print(f"{'plan ' + name:<14} {m['top1']:.4f}  ({m['allocator']} plan trained {_epochs(config.epochs)} at fixed bits)")
    units = {"bitops": "BitOps", "memory": "B"}
    shown = set()
    for name, budget in config.budgets.items():
        cost, unit = m[f"cost_{name}"], units.get(name, get_cost_model(name).unit)
        sep = "" if unit == "B" else " "  # 164KB, 39.5M BitOps
        print(f"{name:<14} {format_si(cost)}{sep}{unit} of budget {format_si(budget)}{sep}{unit} "
              f"({100 * cost / budget:.1f}%)")
        shown.add(name)
    if "bitops" not in shown:
        print(f"{'bitops':<14} {format_si(totals['bitops'])} BitOps (FP32 {format_si(totals['bitops_fp32'])} BitOps)")
    if "memory" not in shown:
        print(f"{'memory':<14} {format_si(totals['weight_bytes'])}B of weights")
    print(f"{'weight bits':<14} {totals['avg_weight_bits']:.2f} on average, weighted by parameters")
    print(format_float_layers(m["float_layers"]), end="")
    print(f"written        {out}/: plan.json, plan.csv, model.pt, metrics.json, history.csv, curves.png, bits.png, "
          "weights.png")
    print(f"next           hwsearch apply {out / 'plan.json'}   (trains the plan again and checks its top-1)")
    return 0


def _cmd_apply(args) -> int:
    from .plan import load_plan
    from .run import verify_plan

    plan = load_plan(args.plan, check_totals=False)  # verify_plan checks the layers against the model first
    result = verify_plan(plan, epochs=args.epochs, device=args.device, progress=not args.quiet, out=args.out,
                         source=args.plan, weights=args.weights)
    from . import dist

    if not dist.is_main():
        return 0
    name = "top-1" if result["metric"] == "top1" else result["metric"]
    print(f"{f'plan {name} (recorded)':<22} {result['plan_top1']:.4f}")
    print(f"{f're-trained {name}':<22} {result['top1']:.4f}  ({_epochs(result['epochs'])} at the plan's bits)")
    print(f"{f'FP32 {name}':<22} {result['fp32_top1']:.4f}")
    return 0


def _cmd_export(args) -> int:
    import json

    import torch

    from .config import RunConfig
    from .export import export_onnx, load_quantized, onnx_top1
    from .learn import load_data
    from .train import evaluate

    run_dir = Path(args.run_dir)
    model, plan = load_quantized(run_dir, model=args.model, with_plan=True)
    out = Path(args.out) if args.out else run_dir / "model.onnx"
    data = None
    if args.verify:  # everything that can fail comes before the file is written
        if plan["metrics"].get("metric", "top1") != "top1":
            raise ValueError(f"--verify: this run's metric is {plan['metrics']['metric']!r} (a Python eval_fn); "
                             f"the command line verifies top-1 only: compare outputs in Python instead")
        cfg_path = run_dir / "config.json"
        fields = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        known = {k: v for k, v in fields.items() if k in RunConfig.__dataclass_fields__}
        cfg = RunConfig(**{**known, "model": plan["model"], "dataset": plan["dataset"], "budgets": {}})
        try:
            data = load_data(cfg, torch.device("cpu"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"--verify: cannot rebuild the run's dataset {plan['dataset']!r} "
                             f"({exc.args[0] if exc.args else exc}); nothing was written") from None
    info = export_onnx(model, plan, out, include_preprocessing=args.include_preprocessing)
    print(f"written        {out} ({info['bytes']:,} bytes; with float weights: {info['float_bytes']:,} bytes)")
    if data is not None:
        print(f"plan top-1     {plan['metrics'].get('top1', float('nan')):.4f}  (recorded in the plan)")
        print(f"PyTorch top-1  {evaluate(model, data):.4f}  (model.pt, the run's test images)")
        raw = args.include_preprocessing
        print(f"ONNX top-1     {onnx_top1(out, data, raw=raw):.4f}  (onnxruntime on the CPU, same images"
              f"{', as uint8 pixels' if raw else ''})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="learn per-layer bits under hardware budgets (SINAREQ) and write a plan")
    add_run_arguments(p)
    p.add_argument("--out", help="run directory (default runs/run-<model>-<dataset>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--bits", type=bits, help="fixed-bit mode: all free layers at these bits, regularized QAT")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("apply", help="validate a plan, re-train at its bits, report top-1")
    p.add_argument("plan", help="a hwsearch.plan/v1 JSON file")
    p.add_argument("--epochs", type=positive_int, help="default: the epochs recorded in the plan")
    p.add_argument("--weights", metavar="FILE",
                   help="the FP32 weights file the plan was made from (default: the path it records; its sha256 "
                        "must match)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="directory for verify.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_apply)

    p = sub.add_parser("export", help="write a run's trained quantized model for deployment (ONNX with Q/DQ)")
    p.add_argument("run_dir", help="a run directory holding model.pt (from hwsearch run or apply --out)")
    p.add_argument("--format", choices=["onnx"], required=True, help="output format (onnx)")
    p.add_argument("--out", help="output file (default RUN_DIR/model.onnx)")
    p.add_argument("--include-preprocessing", action="store_true",
                   help="the graph takes raw uint8 pixels and normalizes them itself ((x/255 - mean)/std)")
    p.add_argument("--model", help="package.module:factory that builds the float model, for a plan whose model "
                                   "cannot be built by its recorded name (default: the plan's model)")
    p.add_argument("--verify", action="store_true",
                   help="run the graph with onnxruntime on the run's test split; print its top-1 beside PyTorch's")
    p.set_defaults(handler=_cmd_export)
