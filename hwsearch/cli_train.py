"""CLI handlers for the training commands: run, apply (search and pareto live in cli_search)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from .units import format_si, parse_quantity, slug


def _quantity(what: str):
    def parse(text: str) -> float:
        try:
            return parse_quantity(text, what=what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _named_budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--budget-cost: expected NAME=VALUE (e.g. bitfusion=2M), got {text!r}")
    try:
        return name, parse_quantity(value, what=f"--budget-cost {name}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_run_arguments(p: argparse.ArgumentParser, *, budgets_required: bool = False) -> None:
    """Arguments shared by `run` and `search`: model, data, quantizer, budgets, schedule."""
    p.add_argument("--model", default="resnet20", help="model name (default resnet20)")
    p.add_argument("--dataset", default="digits", help="digits | cifar10 | svhn | imagefolder:PATH (default digits)")
    p.add_argument("--budget-bitops", type=_quantity("--budget-bitops"), help="BitOps cap, e.g. 0.5G")
    p.add_argument("--budget-memory", type=_quantity("--budget-memory"), help="weight-memory cap in bytes, e.g. 40KB")
    p.add_argument("--budget-cost", type=_named_budget, action="append", default=[], metavar="NAME=VALUE",
                   help="cap on any cost model: loom, stripes, bitfusion, lut:FILE.csv (repeatable)")
    p.add_argument("--cost-model", default="bitops", help="cost behind bit pressure (default bitops)")
    p.add_argument("--quantizer", choices=["dorefa", "wrpn"], default="dorefa")
    p.add_argument("--act-bits", type=int, help="fixed activation bits (default: learned)")
    p.add_argument("--b-min", type=int, default=2)
    p.add_argument("--b-max", type=int, default=8)
    p.add_argument("--init-bits", type=float,
                   help="starting bits of learned layers (default: the tightest budget as uniform bits, else b-max)")
    p.add_argument("--first-last-bits", type=int, default=8, help="bits of first and last layer (0: learn them)")
    p.add_argument("--allocator", choices=["sinareq", "hessian"], default="sinareq",
                   help="who chooses the plan: sinareq (learned bits, default) or hessian (Hessian-trace "
                        "sensitivity and an exact integer program over the budget)")
    p.add_argument("--epochs", type=int,
                   help="epochs of training the chosen plan at fixed bits, as a uniform baseline gets "
                        "(default: 30 on digits, 10 otherwise)")
    p.add_argument("--search-epochs", type=int, help="epochs of SINAREQ's bit-learning phase (default: --epochs)")
    p.add_argument("--plan-lambda-w", type=float,
                   help="regularizer strength while the chosen plan trains (default 0: plain QAT, as uniform)")
    p.add_argument("--fp32-epochs", type=int, help="epochs of the cached FP32 checkpoint (default 30)")
    p.add_argument("--lambda-w", type=float, help="regularizer strength")
    p.add_argument("--lambda-b", type=float, help="bit-pressure strength")
    p.add_argument("--lambda-c", type=float, help="budget-term strength")
    p.add_argument("--lr", type=float, help="max SGD learning rate while quantized")
    p.add_argument("--lr-fp32", type=float, help="max SGD learning rate of the FP32 checkpoint")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-train", type=int, help="train on a fixed random subset of this size")
    p.add_argument("--max-test", type=int, help="test on a fixed random subset of this size")
    p.add_argument("--seed", type=int, default=0, help="seed of the quantized training (default 0)")
    p.add_argument("--fp32-seed", type=int,
                   help="seed of the FP32 checkpoint (default: --seed); fix it to compare seeds from one start")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU: fuses kernels)")
    p.add_argument("--out", help="run directory (default runs/<model>-<dataset>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args, **overrides):
    from .config import RunConfig

    budgets = {}
    if args.budget_bitops:
        budgets["bitops"] = args.budget_bitops
    if args.budget_memory:
        budgets["memory"] = args.budget_memory
    for name, value in args.budget_cost:
        if name in budgets:
            raise ValueError(f"--budget-cost: budget {name!r} given twice")
        budgets[name] = value
    fields = {"model": args.model, "dataset": args.dataset, "budgets": budgets, "cost_model": args.cost_model,
              "quantizer": args.quantizer, "act_bits": args.act_bits, "b_min": args.b_min, "b_max": args.b_max,
              "first_last_bits": args.first_last_bits, "seed": args.seed, "device": args.device,
              "max_train": args.max_train, "max_test": args.max_test, "compile": args.compile,
              "epochs": args.epochs or (30 if args.dataset == "digits" else 10)}
    fields["allocator"] = args.allocator
    for name in ("init_bits", "fp32_epochs", "lambda_w", "lambda_b", "lambda_c", "lr", "lr_fp32", "batch_size",
                 "search_epochs", "plan_lambda_w", "fp32_seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields.update(overrides)
    return RunConfig(**fields)


def default_out(kind: str, args) -> Path:
    return Path("runs") / f"{kind}-{slug(f'{args.model}-{args.dataset}', 60)}-{datetime.now():%Y%m%d-%H%M%S}"


def _cmd_run(args) -> int:
    from .run import run
    from .train import NonFiniteLoss

    if args.bits is not None and args.bits < 1:
        raise ValueError(f"--bits: must be at least 1, got {args.bits}")
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
    m, plan = result.metrics, result.plan
    print(f"FP32 top-1   {m['fp32_top1']:.4f}")
    if "search_top1" in m:
        print(f"search top-1 {m['search_top1']:.4f}  (end of bit learning, {config.learning_epochs} epochs)")
    print(f"plan top-1   {m['top1']:.4f}  (the {m['allocator']} plan trained {config.epochs} epochs at fixed bits)")
    for name, budget in config.budgets.items():
        cost = m[f"cost_{name}"]
        print(f"{name:<12} {format_si(cost)} of budget {format_si(budget)} ({100 * cost / budget:.1f}%)")
    print(f"BitOps       {format_si(plan['totals']['bitops'])} (FP32 {format_si(plan['totals']['bitops_fp32'])}); "
          f"avg weight bits {plan['totals']['avg_weight_bits']:.2f}")
    print(f"plan         {out / 'plan.json'}")
    return 0


def _cmd_apply(args) -> int:
    from .plan import load_plan
    from .run import verify_plan

    plan = load_plan(args.plan)
    result = verify_plan(plan, epochs=args.epochs, device=args.device, progress=not args.quiet, out=args.out)
    print(f"plan top-1 (recorded) {result['plan_top1']:.4f}")
    print(f"re-trained top-1      {result['top1']:.4f}  ({result['epochs']} epochs at the plan's bits)")
    print(f"FP32 top-1            {result['fp32_top1']:.4f}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="learn per-layer bits under hardware budgets (SINAREQ) and write a plan")
    add_run_arguments(p)
    p.add_argument("--bits", type=int, help="fixed-bit mode: all free layers at these bits, regularized QAT")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("apply", help="validate a plan, re-train at its bits, report top-1")
    p.add_argument("plan", help="a hwsearch.plan/v1 JSON file")
    p.add_argument("--epochs", type=int, help="default: the epochs recorded in the plan")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="directory for verify.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_cmd_apply)
    from . import cli_search

    cli_search.add_commands(sub)
