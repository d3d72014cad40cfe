"""Argument types and the arguments shared by `run` and `search`: every number is checked where it
is parsed, so bad input is one line naming the option (exit status 2)."""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

from .units import parse_quantity, slug


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _float(low: float, *, strict: bool) -> callable:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text!r}")
        return value
    return parse


positive_float = _float(0.0, strict=True)
non_negative_float = _float(0.0, strict=False)


def bits(text: str) -> int:
    """Bits: a whole number within 1..32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a whole number within 1..32, got {text!r}") from None
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"bits must be within 1..32, got {value}")
    return value


def _quantity(what: str, unit: str = "count"):
    def parse(text: str) -> float:
        try:
            return parse_quantity(text, what=what, unit=unit)
        except ValueError as exc:
            # argparse already names the option ("argument --budget-bitops: ..."): say it once.
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what}: ")) from None
    return parse


def _named_budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--budget-cost: expected NAME=VALUE (e.g. bitfusion=2M), got {text!r}")
    try:
        from cost_models import get_cost_model

        unit = "bytes" if get_cost_model(name).unit == "bytes" else "count"
        return name, parse_quantity(value, what=f"--budget-cost {name}", unit=unit)
    except (ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(str(exc.args[0] if exc.args else exc)) from None


def _stats(option: str):
    """Per-channel normalization values: numbers separated by commas, or 'none'."""
    def parse(text: str):
        if text.strip().lower() == "none":
            return "none"
        try:
            values = tuple(float(t) for t in text.split(","))
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas (e.g. 0.49,0.48,0.45), or "
                                             f"'none', got {text!r}")
        return values
    return parse


def normalization(args) -> dict:
    """RunConfig's input_mean/input_std from --input-mean/--input-std ('none' for both: (0,) and (1,))."""
    mean, std = args.input_mean, args.input_std
    if mean is None and std is None:
        return {}
    if mean == "none" or std == "none":
        if {mean, std} - {"none", None}:
            raise ValueError("--input-mean/--input-std: 'none' means no normalization; give it to both or "
                             "numbers to both")
        return {"input_mean": (0.0,), "input_std": (1.0,)}
    if mean is None or std is None:
        raise ValueError("--input-mean/--input-std: give both (or neither: the dataset's own statistics)")
    return {"input_mean": mean, "input_std": std}


def add_run_arguments(p: argparse.ArgumentParser, *, budgets_required: bool = False) -> None:
    """Arguments shared by `run` and `search`: model, data, quantizer, budgets, schedule."""
    p.add_argument("--model", default="resnet20",
                   help="registered or torchvision name, or package.module:factory (default resnet20)")
    p.add_argument("--weights", metavar="FILE",
                   help="your trained FP32 weights (a state_dict file): used as given, no FP32 training")
    p.add_argument("--input-mean", type=_stats("--input-mean"), metavar="M[,M,M]|none",
                   help="per-channel mean your weights were trained with, on pixels in [0,1] (default: the "
                        "dataset's); 'none' with --input-std none: pixels in [0,1], not normalized")
    p.add_argument("--input-std", type=_stats("--input-std"), metavar="S[,S,S]|none",
                   help="per-channel std your weights were trained with (default: the dataset's)")
    p.add_argument("--dataset", default="digits", help="digits | cifar10 | svhn | imagefolder:PATH (default digits)")
    p.add_argument("--data-mode", choices=["auto", "memory", "stream"], default="auto",
                   help="imagefolder: hold the decoded set in memory, or stream it from disk per batch (default "
                        "auto: memory while it fits under HWSEARCH_MEMORY_LIMIT, a tenth of free memory)")
    p.add_argument("--image-size", type=positive_int,
                   help="imagefolder: side of the square input (default: the images' own); above 64 pixels "
                        "training uses RandomResizedCrop, testing Resize and CenterCrop")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips (digits, text)")
    p.add_argument("--loader-workers", type=non_negative_int,
                   help="stream mode: DataLoader worker processes (default: cores - 1)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: batch norm over the global batch")
    p.add_argument("--budget-bitops", type=_quantity("--budget-bitops"),
                   help="BitOps cap: a number with an optional SI multiplier, e.g. 0.5G or 300M")
    p.add_argument("--budget-memory", type=_quantity("--budget-memory", "bytes"),
                   help="weight-memory cap in bytes: 40000, 40KB (1000s), 40KiB (1024s); bits as Kb, Mb")
    p.add_argument("--budget-cost", type=_named_budget, action="append", default=[], metavar="NAME=VALUE",
                   help="cap on any cost model: loom, stripes, bitfusion, lut:FILE.csv (repeatable)")
    p.add_argument("--cost-model", default="bitops", help="cost behind bit pressure (default bitops)")
    p.add_argument("--quantizer", choices=["dorefa", "wrpn"], default="dorefa",
                   help="weight quantizer (default dorefa); activations always use PACT")
    p.add_argument("--act-bits", type=bits, help="fixed activation bits (default: learned)")
    p.add_argument("--b-min", type=bits, default=2, help="lowest bits an allocator may choose (default 2)")
    p.add_argument("--b-max", type=bits, default=8, help="highest bits an allocator may choose (default 8)")
    p.add_argument("--init-bits", type=positive_float,
                   help="starting bits of learned layers (default: the tightest budget as uniform bits, else b-max)")
    p.add_argument("--first-last-bits", type=non_negative_int, default=8,
                   help="bits of the first and last layer (default 8; 0: the allocator chooses them too)")
    p.add_argument("--allocator", choices=["sinareq", "hessian", "measured"], default="sinareq",
                   help="who chooses the plan: sinareq (learned bits, default), hessian (Hessian-trace "
                        "sensitivity and an exact integer program over the budget) or measured (the same "
                        "program on each layer's measured loss increase)")
    p.add_argument("--measured-qat-epochs", type=non_negative_int,
                   help="measured allocator: first train this many epochs at the uniform bits the budget "
                        "affords and measure each layer's loss change there (default 0: on the FP32 model)")
    p.add_argument("--tie-bits", action="store_true",
                   help="one bitwidth per layer for its weights and its input (HAWQ-V3's convention)")
    p.add_argument("--epochs", type=positive_int,
                   help="epochs of training the chosen plan at fixed bits, as a uniform baseline gets "
                        "(default: 30 on digits, 10 otherwise)")
    p.add_argument("--search-epochs", type=positive_int, help="epochs of SINAREQ's bit-learning phase (default: --epochs)")
    p.add_argument("--plan-lambda-w", type=non_negative_float,
                   help="regularizer strength while the chosen plan trains (default 0: plain QAT, as uniform)")
    p.add_argument("--fp32-epochs", type=positive_int, help="epochs of the cached FP32 checkpoint (default 30)")
    p.add_argument("--lambda-w", type=non_negative_float, help="SINAREQ regularizer strength (default 1)")
    p.add_argument("--lambda-b", type=non_negative_float, help="bit-pressure strength (default 0.05)")
    p.add_argument("--lambda-c", type=non_negative_float, help="budget-term strength (default 2)")
    p.add_argument("--lambda-s", type=non_negative_float,
                   help="SINAREQ: strength of each layer's measured loss increase at its learned bits (default 0: off)")
    p.add_argument("--lr", type=positive_float, help="max SGD learning rate while quantized (default 0.02)")
    p.add_argument("--lr-fp32", type=positive_float, help="max SGD learning rate of the FP32 checkpoint (default 0.1)")
    p.add_argument("--batch-size", type=positive_int,
                   help="training batch size (default 128); under torchrun the global batch, split over the processes")
    p.add_argument("--max-train", type=positive_int, help="train on a fixed random subset of this size")
    p.add_argument("--max-test", type=positive_int, help="test on a fixed random subset of this size")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the quantized training (default 0)")
    p.add_argument("--fp32-seed", type=non_negative_int,
                   help="seed of the FP32 checkpoint (default: --seed); fix it to compare seeds from one start")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU: fuses kernels)")
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
              "tie_bits": args.tie_bits, "epochs": args.epochs, "weights": args.weights, **normalization(args),
              "data_mode": args.data_mode, "image_size": args.image_size, "flip": not args.no_flip,
              "loader_workers": args.loader_workers, "sync_bn": args.sync_bn}
    fields["allocator"] = args.allocator
    for name in ("init_bits", "fp32_epochs", "lambda_w", "lambda_b", "lambda_c", "lambda_s", "lr", "lr_fp32", "batch_size",
                 "search_epochs", "plan_lambda_w", "fp32_seed", "measured_qat_epochs"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields.update(overrides)
    return RunConfig(**fields)


def default_out(kind: str, args) -> Path:
    return Path("runs") / f"{kind}-{slug(f'{args.model}-{args.dataset}', 60)}-{datetime.now():%Y%m%d-%H%M%S}"


def format_float_layers(left: list[dict]) -> str:
    """Lines naming every MAC-bearing layer left in float and why ('' when there is none)."""
    if not left:
        return ""
    lines = [f"left in float (32 bits, counted so): {len(left)} layer{'s' if len(left) > 1 else ''}"]
    lines += [f"  {row['name']} ({row['op']}, {row['macs']:,} MACs): {row['reason']}" for row in left]
    return "\n".join(lines) + "\n"
