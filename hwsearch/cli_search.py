"""CLI handlers for `hwsearch search` and `hwsearch pareto`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_args import add_run_arguments, config_from_args, positive_int
from .units import format_si, slug


def _bits_list(text: str) -> tuple[float, ...]:
    import argparse
    import math

    if text.strip().lower() in ("", "none"):
        return ()
    try:
        bits = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        bits = (math.nan,)
    if not all(math.isfinite(b) for b in bits):
        raise argparse.ArgumentTypeError(f"expected bitwidths separated by commas (e.g. 2.5,3,4), or 'none', "
                                         f"got {text!r}") from None
    return tuple(int(b) if b == int(b) else b for b in bits)


def _cmd_search(args) -> int:
    from .pareto import write_pareto
    from .study import SearchConfig, search

    base = config_from_args(args)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    config = SearchConfig(base=base, trials=args.trials, objectives=objectives, sampler=args.sampler,
                          seed=args.sampler_seed, storage=args.storage, study_name=args.study,
                          learn_act_bits=not args.sample_act_bits, heartbeat_s=args.heartbeat,
                          grace_s=args.grace, baselines=not args.no_baselines, anchor_bits=args.anchor_bits)
    out = Path(args.out) if args.out else Path("runs") / f"search-{slug(f'{args.model}-{args.dataset}-{args.study}')}"
    try:
        result = search(config, out=out, progress=not args.quiet)
    except KeyboardInterrupt:
        print("hwsearch: search interrupted; finished trials are kept in the study; the same command resumes it",
              file=sys.stderr)
        return 130
    from . import dist

    if not dist.is_main():  # under torchrun rank 0 holds the study and reports
        return 0
    summary = write_pareto(result.study, out)
    print(f"study {args.study}: {result.completed} finished trials ({len(result.ran_here)} run by this worker)")
    _print_summary(result.study, summary, out)
    return 0


def _print_summary(study, summary: dict, out: Path) -> None:
    """The front as a table against the uniform curve, the FP32 point and both hypervolumes."""
    import pandas as pd

    from .pareto import baselines_frame, front_table, trials_frame

    objectives = summary["objectives"]
    baselines = baselines_frame(study)
    table = front_table(trials_frame(study), baselines, objectives)
    if not table.empty:
        shown = table.copy()
        for c in objectives[1:]:
            shown[c] = shown[c].map(lambda v: format_si(v))
        for c in (objectives[0], "uniform top1"):
            shown[c] = shown[c].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.2f}%")
        shown["difference"] = shown["difference"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:+.2f} pt")
        print(shown.to_string(index=False))
    fp32 = baselines[baselines["label"] == "FP32"] if not baselines.empty else baselines
    if len(fp32):
        print(f"FP32: top-1 {100 * fp32[objectives[0]].iloc[0]:.2f}% at {format_si(fp32[objectives[1]].iloc[0])} "
              f"{objectives[1]}")
    if summary["hypervolume"] is not None:
        hv, base = summary["hypervolume"], summary["baseline_hypervolume"]
        print(f"hypervolume: front {hv:.4f}, uniform baselines {base:.4f} (ratio {hv / base if base else float('nan'):.4f})")
    print(f"written: {out}/front.csv, front.json, trials.csv, pareto.png, hypervolume.png")


def _cmd_pareto(args) -> int:
    import optuna

    from .pareto import write_pareto
    from .study import SearchError

    storage, study_name = args.storage, args.study
    if args.run_dir:
        meta_path = Path(args.run_dir) / "search.json"
        if not meta_path.is_file():
            raise ValueError(f"pareto: {args.run_dir} holds no search.json; give a search run directory "
                             f"or --storage URL --study NAME")
        meta = json.loads(meta_path.read_text())
        storage = storage or meta["storage"]
        study_name = study_name or meta["study"]
        if "***" in storage:
            raise ValueError("pareto: this run used a password-protected storage; pass --storage URL --study NAME")
    if not storage or not study_name:
        raise ValueError("pareto: give RUN_DIR, or --storage URL and --study NAME")
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise SearchError(f"pareto: no study {study_name!r} in that storage") from None
    except Exception as exc:
        raise SearchError(f"pareto: storage cannot be reached: {str(exc).splitlines()[0]}") from None
    out = Path(args.out or args.run_dir or f"runs/pareto-{study_name}")
    summary = write_pareto(study, out, export_plans=args.export_plans)
    print(f"front: {summary['front_size']} of {summary['completed']} finished trials")
    _print_summary(study, summary, out)
    if args.export_plans:
        print(f"plans        {args.export_plans}/")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("search", help="Optuna multi-objective search: top-1 against hardware cost")
    add_run_arguments(p)
    p.add_argument("--out", help="run directory: trials, plots and the default SQLite study "
                   "(default runs/search-<model>-<dataset>-<study>, so the same command resumes)")
    p.add_argument("--trials", type=positive_int, default=16, help="finished trials the study must hold")
    p.add_argument("--objectives", default="bitops", help="costs to minimize, comma-separated (e.g. bitops,memory)")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--storage", help="SQLAlchemy URL, e.g. postgresql://user:pw@host/db (default: DIR/study.db)")
    p.add_argument("--study", default="hwsearch", help="study name (workers sharing a storage join by name)")
    p.add_argument("--sample-act-bits", action="store_true", help="sample uniform activation bits per trial "
                   "instead of learning them")
    p.add_argument("--heartbeat", type=positive_int, default=10, help="seconds between a trial's heartbeats")
    p.add_argument("--grace", type=positive_int, default=30, help="seconds after which a silent trial is retried")
    p.add_argument("--no-baselines", action="store_true", help="skip the uniform W/A 2,3,4,8 baselines")
    p.add_argument("--anchor-bits", type=_bits_list, default=(2, 2.5, 3, 4), metavar="B,B",
                   help="the first trials aim at the cost of uniform W<B>A<B> with the base strengths; a "
                        "fractional B aims between two uniform costs (2.5: geometric mean of W2A2's and "
                        "W3A3's) (default 2,2.5,3,4; 'none': every trial sampled)")
    p.set_defaults(handler=_cmd_search)

    p = sub.add_parser("pareto", help="Pareto front, hypervolume and plots from a stored study")
    p.add_argument("run_dir", nargs="?", help="a search run directory")
    p.add_argument("--storage", help="SQLAlchemy URL of the study's storage (instead of RUN_DIR)")
    p.add_argument("--study", help="study name in that storage")
    p.add_argument("--out", help="output directory (default: RUN_DIR)")
    p.add_argument("--export-plans", help="write each front plan as a hwsearch.plan/v1 file here")
    p.set_defaults(handler=_cmd_pareto)
