"""The `hwsearch` command line: a thin layer over the Python API.

Every handler parses, builds a config, calls the API and writes outputs. Bad input
prints one line ``hwsearch: error: ...`` and returns 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .cli_args import bits, format_float_layers
from .units import parse_shape

__all__ = ["main"]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2 via main()
        raise UsageError(message)


def _shape(text: str):
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- cost
def _cmd_cost(args) -> int:
    import pandas as pd

    from .costs import cost_report, float_layers, quantizable_layers, uniform_bits
    from .profiling import profile_model

    table, model = profile_model(args.model, args.input_shape, num_classes=args.num_classes)
    # Priced as `run` quantizes: rows hwsearch cannot quantize stay at 32 bits, and are listed.
    w, a = uniform_bits(table, args.w_bits, args.a_bits, first_last_bits=args.first_last_bits,
                        input_bits=args.input_bits, quantizable=quantizable_layers(table, model))
    rows, totals = cost_report(table, w, a)
    left = float_layers(table, model)
    if args.format == "json":
        json.dump({"model": args.model, "input_shape": list(table.input_shape), "layers": rows, "totals": totals,
                   "float_layers": left}, sys.stdout, indent=1)
        print()
    elif args.format == "csv":
        pd.DataFrame(rows).to_csv(sys.stdout, index=False)
    else:
        print(format_cost_table(rows, totals))
        print(format_float_layers(left), end="")
    return 0


def _number(value: float, decimals: int = 0) -> str:
    return f"{value:,.{decimals}f}" if decimals else f"{round(value):,}"


def format_cost_table(rows: list[dict], totals: dict) -> str:
    """The per-layer table and the totals, every number grouped in thousands with its unit in the header
    (bytes to 0.1, accelerator cycles rounded to whole cycles)."""
    cols = [("layer", "name", str), ("op", "op", str), ("MACs", "macs", _number), ("params", "params", _number),
            ("w bits", "weight_bits", lambda v: "-" if v is None else str(v)), ("a bits", "act_bits", str),
            ("BitOps", "bitops", _number), ("weight bytes", "weight_bytes", lambda v: _number(v, 1))]
    cells = [[head for head, _, _ in cols]] + [[fmt(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    named = [("MACs", "macs", "MACs", 0), ("BitOps", "bitops", "BitOps", 0), ("BitOps at FP32", "bitops_fp32", "BitOps", 0),
             ("weight memory", "weight_bytes", "bytes", 1), ("other parameters", "other_bytes", "bytes (32-bit)", 0),
             ("weight parameters", "params", "", 0), ("avg weight bits", "avg_weight_bits",
                                                                 "weighted by parameters", 2)]
    named += [(f"{k[:-len('_cycles')]} cycles", k, "cycles", 0) for k in totals if k.endswith("_cycles")]
    lines.append("")
    for label, key, unit, decimals in named:
        value = totals[key]
        text = f"{value:.{decimals}f}" if key == "avg_weight_bits" else _number(value, decimals)
        lines.append(f"{label:>18}  {text} {unit}")
    return "\n".join(lines)


def _cmd_models(args) -> int:
    from .models import list_models, models

    for name in list_models(args.pattern):
        desc = models.get(name).description if name in models else "torchvision"
        print(f"{name:28s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hwsearch", description="Hardware-aware mixed-precision quantization search (SINAREQ).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("cost", help="per-layer MACs, BitOps, memory and accelerator cost of a model")
    p.add_argument("--model", required=True, help="registered, torchvision, or package.module:factory")
    p.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224 (default: the model's own size)")
    p.add_argument("--num-classes", type=int, help="default 1000 at 224x224 inputs, else 10")
    p.add_argument("--w-bits", type=bits, default=32, help="uniform weight bits (default 32 = float)")
    p.add_argument("--a-bits", type=bits, default=32, help="uniform activation bits (default 32 = float)")
    p.add_argument("--first-last-bits", type=int, default=8, choices=range(0, 33), metavar="{0..32}",
                   help="first and last layers kept at these bits when the uniform bits are lower (0: off)")
    p.add_argument("--input-bits", type=bits, default=8, help="bits of the image input (default 8)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(handler=_cmd_cost)

    p = sub.add_parser("models", help="list the models hwsearch can build")
    p.add_argument("pattern", nargs="?", help="glob, e.g. 'resnet*'")
    p.set_defaults(handler=_cmd_models)
    _add_training_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """Commands of the training side (run, apply, search, pareto) are added by their modules."""
    from . import cli_search, cli_train

    cli_train.add_commands(sub)
    cli_search.add_commands(sub)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged (not the stream at setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def usage_markdown() -> str:
    """docs/usage.md: every command and option, from the parsers themselves (so the page cannot drift;
    tests/test_docs.py checks it). Regenerate with ``python -m hwsearch.cli > docs/usage.md``."""
    import functools

    parser = build_parser()
    fixed = functools.partial(argparse.HelpFormatter, width=100)
    parser.formatter_class = fixed
    parts = ["# Command-line reference", "",
             "Generated from the argument parsers by `python -m hwsearch.cli > docs/usage.md` (a test checks that "
             "it is current). The reasons and details are in [`commands.md`](commands.md).", "",
             "```", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = fixed
        parts += [f"## `hwsearch {name}`", "", helps.get(name, "") or "", "", "```", p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from cost_models import UncountedOpsError

    from .data import DatasetUnavailable
    from .study import SearchError

    # torch.utils.cpp_extension (the fused CPU kernel's build, torch.compile on a CPU) warns on import
    # that no CUDA runtime is found: true, and irrelevant to CPU work.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # hwsearch's own notices (a cache rebuilt, a layer left in float) go to stderr, one line each.
    log = logging.getLogger("hwsearch")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hwsearch: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"hwsearch: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, UncountedOpsError, DatasetUnavailable, FileNotFoundError, SearchError) as exc:
        print(f"hwsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"hwsearch: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    print(usage_markdown(), end="")
