"""Pareto front, hypervolume and pictures from stored trials alone.

Computing (``trials_frame``, ``pareto_mask``, ``hypervolume``, ``front``) is kept apart from
drawing (``plot_front``, ``plot_hypervolume_history``), which takes an optional ``ax``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .files import atomic_path, write_json

__all__ = ["front", "front_table", "uniform_at", "hypervolume", "hypervolume_history", "load_run", "pareto_mask", "plot_front",
           "plot_hypervolume_history", "reference_point", "trials_frame", "write_pareto"]


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Non-dominated rows of ``points`` (all objectives minimized). Duplicates are all kept."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(pts <= pts[i], axis=1) & np.any(pts < pts[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by ``points`` and bounded by ``ref`` (all objectives minimized).

    Exact: a sweep in 2-D, recursive slicing (HSO) in more dimensions. Points not strictly
    better than ``ref`` in every objective contribute nothing.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    ref = np.asarray(ref, dtype=float)
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[pareto_mask(pts)]
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    if pts.shape[1] == 2:
        pts = pts[np.argsort(pts[:, 0])]
        volume, best_y = 0.0, ref[1]
        for x, y in pts:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    # Slice along the last objective.
    order = np.argsort(pts[:, -1])
    pts = pts[order]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        depth = upper - pts[i, -1]
        if depth > 0:
            volume += depth * hypervolume(pts[: i + 1, :-1], ref[:-1])
    return float(volume)


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: number, state, objective values, parameters, and the plan's bits per layer
    (``w_bits``, ``a_bits``: JSON lists in the order of the study's ``layers``)."""
    names = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name}
        values = t.values or [np.nan] * len(names)
        row.update(dict(zip(names, values)))
        row.update({f"param_{k}": v for k, v in t.params.items()})
        for key in ("w_bits", "a_bits"):
            row[key] = json.dumps(t.user_attrs[key]) if key in t.user_attrs else None
        rows.append(row)
    return pd.DataFrame(rows)


def baselines_frame(study) -> pd.DataFrame:
    attrs = study.user_attrs
    names = attrs.get("objectives", [])
    stored = sorted((v for k, v in attrs.items() if k.startswith("baseline_w")), key=lambda b: b["bits"])
    rows = [{"label": b["label"], **dict(zip(names, b["values"]))} for b in stored]
    if "fp32" in attrs:
        rows.append({"label": "FP32", **dict(zip(names, attrs["fp32"]["values"]))})
    return pd.DataFrame(rows, columns=["label", *names])  # the columns even without baselines (--no-baselines)


def _minimized(df: pd.DataFrame, objectives: list[str]) -> np.ndarray:
    """Objectives as minimization: top-1 error and the costs."""
    cols = [1.0 - df[objectives[0]].to_numpy(float)] + [df[c].to_numpy(float) for c in objectives[1:]]
    return np.stack(cols, axis=1)


def reference_point(baselines: pd.DataFrame, objectives: list[str]) -> dict:
    """Top-1 error 1.0 and, for each cost, the uniform W8A8 baseline's cost: a plan that costs more
    than 8-bit everywhere adds nothing."""
    ref = {objectives[0]: 0.0}
    w8 = baselines[baselines["label"] == "W8A8"]
    for c in objectives[1:]:
        ref[c] = float(w8[c].iloc[0]) if len(w8) else float(baselines[c].max())
    return ref


def front(trials: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=objectives)
    if done.empty:
        return done
    mask = pareto_mask(_minimized(done, objectives))
    return done[mask].sort_values(objectives[1])


def _hv(df: pd.DataFrame, objectives: list[str], ref: dict) -> float:
    if df.empty:
        return 0.0
    pts = _minimized(df, objectives)
    ref_vec = np.array([1.0 - ref[objectives[0]]] + [ref[c] for c in objectives[1:]])
    scale = np.array([1.0] + [ref[c] for c in objectives[1:]])  # costs normalized by the reference
    return hypervolume(pts / scale, ref_vec / scale)


def uniform_at(baselines: pd.DataFrame, objectives: list[str], costs) -> np.ndarray:
    """The uniform baselines' top-1 at each cost, interpolated linearly in log-cost between the uniform
    points (NaN outside their range)."""
    b = baselines[baselines["label"] != "FP32"].sort_values(objectives[1]) if not baselines.empty else baselines
    if len(b) < 2:
        return np.full(len(costs), np.nan)
    x, y = np.log(b[objectives[1]].to_numpy(float)), b[objectives[0]].to_numpy(float)
    c = np.log(np.asarray(costs, dtype=float))
    return np.where((c >= x[0]) & (c <= x[-1]), np.interp(c, x, y), np.nan)


def front_table(trials: pd.DataFrame, baselines: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """The front by cost: trial, each cost, top-1, the uniform curve's top-1 at that cost and the difference."""
    f = front(trials, objectives)
    if f.empty:
        return pd.DataFrame()
    acc, cost = objectives[0], objectives[1]
    table = f[["number", *objectives[1:], acc]].rename(columns={"number": "trial"}).reset_index(drop=True)
    table["uniform top1"] = uniform_at(baselines, objectives, table[cost])
    table["difference"] = table[acc] - table["uniform top1"]
    return table


def hypervolume_history(trials: pd.DataFrame, objectives: list[str], ref: dict) -> pd.DataFrame:
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=objectives).sort_values("number")
    return pd.DataFrame([{"trials": k, "hypervolume": _hv(done.iloc[:k], objectives, ref)}
                         for k in range(1, len(done) + 1)])


def plot_front(trials: pd.DataFrame, baselines: pd.DataFrame, objectives: list[str], ax=None):
    """All trials, the front, the uniform baselines and FP32: top-1 against the first cost."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4.5))
    acc, cost = objectives[0], objectives[1]
    done = trials[trials["state"] == "COMPLETE"]
    f = front(trials, objectives)
    ax.plot(f[cost], f[acc], "-", color="C0", lw=1.5, label="Pareto front", zorder=1)
    # Trials drawn over the front line, hollow, so none hides under it; front members filled.
    ax.scatter(done[cost], done[acc], s=28, facecolors="none", edgecolors="0.4", label="trials", zorder=3)
    ax.scatter(f[cost], f[acc], s=14, color="C0", zorder=4)
    if not baselines.empty:
        b = baselines[baselines["label"] != "FP32"]
        ax.plot(b[cost], b[acc], "s--", color="C1", label="uniform W/A")
        for _, row in b.iterrows():
            ax.annotate(row["label"], (row[cost], row[acc]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        fp = baselines[baselines["label"] == "FP32"]
        ax.plot(fp[cost], fp[acc], "*", ms=12, color="C3", label="FP32")
    ax.set_xscale("log")
    ax.set_xlabel(cost)
    ax.set_ylabel("top-1")
    ax.legend(fontsize=8)
    return ax


def plot_hypervolume_history(history: pd.DataFrame, ax=None, baseline: float | None = None):
    """Hypervolume of the front as trials finish, with the uniform baselines' hypervolume as a line."""
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history["trials"], history["hypervolume"], "o-", label="front")
    if baseline is not None:
        ax.axhline(baseline, color="C1", ls="--", lw=1, label="uniform baselines")
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    return ax


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Trials, baselines and objective names from a directory written by ``write_pareto`` (or a
    trials CSV beside a ``baselines.csv``)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    trials = pd.read_csv(directory / "trials.csv" if path.is_dir() else path)
    base_path = directory / "baselines.csv"
    try:
        baselines = pd.read_csv(base_path) if base_path.exists() else pd.DataFrame()
    except pd.errors.EmptyDataError:  # a study without baselines (--no-baselines)
        baselines = pd.DataFrame()
    meta = directory / "front.json"
    objectives = json.loads(meta.read_text())["objectives"] if meta.exists() else \
        [c for c in trials.columns if c == "top1"] + [c for c in trials.columns
                                                      if c not in ("number", "state", "w_bits", "a_bits", "top1")
                                                      and not c.startswith("param_")]
    return trials, baselines, objectives


def write_pareto(study, out: str | Path, *, export_plans: str | Path | None = None) -> dict:
    """Write trials.csv, baselines.csv, front.csv, front.json (with the hypervolume and its
    reference point), pareto.png and hypervolume.png. Returns the summary dict."""
    from .plan import save_plan
    from .plots import new_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    objectives = study.user_attrs.get("objectives")
    trials = trials_frame(study)
    baselines = baselines_frame(study)
    f = front(trials, objectives) if not trials.empty else trials
    # The hypervolume's reference is top-1 0 (error 1): it has a meaning for top-1, not for a metric of
    # the user's (an eval_fn), whose range hwsearch does not know; nor without baselines.
    metric = study.user_attrs.get("metric", "top1")
    ref = reference_point(baselines, objectives) if not baselines.empty and metric == "top1" else None
    summary = {"study": study.study_name, "objectives": objectives,
               "completed": int((trials["state"] == "COMPLETE").sum()) if not trials.empty else 0,
               "front_size": len(f), "reference_point": ref,
               "hypervolume": _hv(f, objectives, ref) if ref else None,
               "baseline_hypervolume": _hv(baselines[baselines.label != "FP32"], objectives, ref) if ref else None,
               "hypervolume_note": ("objectives as minimization (1 - top1, cost / reference cost); "
                                    "reference: top-1 0 and the uniform W8A8 cost") if ref else
                                   ("not available: " + ("the study has no uniform baselines" if baselines.empty
                                                         else f"the metric is {metric!r}, not top-1")),
               "metric": metric,
               "layers": study.user_attrs.get("layers"),
               "front": [{k: v for k, v in row.items() if k not in ("w_bits", "a_bits")} for row in f.to_dict("records")]}
    for name, frame in (("trials.csv", trials), ("baselines.csv", baselines), ("front.csv", f)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    write_json(out / "front.json", summary, default=float)
    if not trials.empty and len(objectives) >= 2:
        fig = new_figure(figsize=(7, 4.5))
        ax = plot_front(trials, baselines, objectives, ax=fig.subplots())
        ax.set_title(f"{study.study_name}: hypervolume {summary['hypervolume'] or 0:.4f} "
                     f"(uniform baselines {summary['baseline_hypervolume'] or 0:.4f})", fontsize=9)
        fig.tight_layout()
        with atomic_path(out / "pareto.png") as tmp:
            fig.savefig(tmp, dpi=110)
        if ref:
            fig = new_figure(figsize=(5, 3))
            plot_hypervolume_history(hypervolume_history(trials, objectives, ref), ax=fig.subplots(),
                                     baseline=summary["baseline_hypervolume"])
            fig.tight_layout()
            with atomic_path(out / "hypervolume.png") as tmp:
                fig.savefig(tmp, dpi=110)
    if export_plans:
        from .study import plan_of_trial, study_table

        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        table = study_table(study) if len(f) else None  # profiled once for every plan
        for number in f["number"]:
            plan = plan_of_trial(study, by_number[int(number)], table=table)
            save_plan(plan, Path(export_plans) / f"plan_trial{int(number):04d}.json")
    return summary
