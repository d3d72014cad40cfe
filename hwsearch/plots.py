"""Pictures of a run: training curves, bits per layer, weights against quantization levels.

Each figure has a function that builds a tidy DataFrame and one that draws it on an optional
``ax``; nothing here calls ``plt.show()``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .files import atomic_path

__all__ = ["bits_frame", "plot_bits", "plot_curves", "plot_weight_histogram", "save_run_plots"]


def _axes(ax, **kw):
    """The given axes, or new ones from pyplot (the active backend: inline in a notebook)."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(**kw)
    return ax


def new_figure(**kw):
    """A figure outside pyplot, for writing files: no backend is chosen or changed."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def bits_frame(plan: dict) -> pd.DataFrame:
    """One row per layer: name, weight bits, activation bits, share of BitOps."""
    df = pd.DataFrame(plan["layers"])
    df["bitops_share"] = df["bitops"] / max(df["bitops"].sum(), 1e-12)
    return df[["name", "op", "weight_bits", "act_bits", "bitops_share"]]


def plot_bits(plan: dict, ax=None):
    ax = _axes(ax, figsize=(max(6, 0.35 * len(plan["layers"])), 3.5))
    df = bits_frame(plan)
    x = range(len(df))
    ax.bar([i - 0.2 for i in x], df["weight_bits"].fillna(0), width=0.4, label="weight bits")
    ax.bar([i + 0.2 for i in x], df["act_bits"], width=0.4, label="activation bits")
    ax.set_xticks(list(x), df["name"], rotation=75, fontsize=7)
    ax.set_ylabel("bits")
    ax.set_title(f"{plan['model']} on {plan['dataset']}: top-1 {plan['metrics'].get('top1', float('nan')):.3f}")
    ax.legend(fontsize=8)
    return ax


def plot_curves(history: pd.DataFrame, budget_name: str | None = None, axes=None, marks: dict | None = None):
    """Task loss, average learned bits, and cost over budget, against training step (the phases of a
    run, bit learning then training the plan, one after the other, the boundary marked).

    ``marks`` maps a label to a step of the first phase (e.g. where the regularizer switches on and
    where bits freeze); each is drawn as a labelled vertical line."""
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    h = history.copy()
    if "phase" not in h:
        h["phase"] = "train"
    # Steps restart in every phase: lay the phases end to end.
    offsets, offset = {}, 0
    for phase in dict.fromkeys(h["phase"]):
        offsets[phase] = offset
        offset += int(h.loc[h["phase"] == phase, "step"].max())
    h["global_step"] = h["step"] + h["phase"].map(offsets)
    for phase, g in h.groupby("phase", sort=False):
        axes[0].plot(g["global_step"], g["task_loss"], label=phase)
    axes[0].set_title("task loss")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend(fontsize=8)
    drawn = False
    for col, label in (("avg_w_bits", "weights"), ("avg_a_bits", "activations")):
        if col in h and h[col].notna().any():
            axes[1].plot(h["global_step"], h[col], label=label)
            drawn = True
    axes[1].set_title("average bits over quantized layers (plain mean)")
    axes[1].set_ylabel("bits")
    if drawn:
        axes[1].legend(fontsize=8)
    if "cost_ratio" in h and h["cost_ratio"].notna().any():
        axes[2].plot(h["global_step"], h["cost_ratio"])
        axes[2].axhline(1.0, color="k", ls="--", lw=1)
        lo = min(0.5, float(h["cost_ratio"].min()) * 0.95)
        axes[2].set_ylim(lo, max(1.1, float(h["cost_ratio"].max()) * 1.05))
        axes[2].set_title(f"{budget_name or 'cost'} of round(bits) / budget")
        axes[2].set_ylabel("ratio")
    elif "regularizer" in h:
        axes[2].plot(h["global_step"], h["regularizer"])
        axes[2].set_title("SINAREQ regularizer")
        axes[2].set_ylabel("Σ R_l")
    for ax in axes:
        ax.set_xlabel("training step")
        for phase, start in list(offsets.items())[1:]:
            ax.axvline(start, color="0.5", lw=0.8, ls=":")
            ax.annotate(phase, (start, 1.0), xycoords=("data", "axes fraction"), fontsize=6, xytext=(2, -9),
                        textcoords="offset points", color="0.4")
        for i, (label, step) in enumerate((marks or {}).items()):
            ax.axvline(step, color=f"C{3 + i}", lw=0.8, ls="--")
            ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=6, xytext=(2, -18 - 9 * i),
                        textcoords="offset points", color=f"C{3 + i}")
    return axes


def plot_weight_histogram(u_before, u_after, levels, title: str, ax=None):
    """Histogram of one layer's weights in grid units before and after, with the quantization levels."""
    ax = _axes(ax, figsize=(7, 3.2))
    ax.hist(u_before, bins=200, alpha=0.5, label="FP32 checkpoint", density=True)
    ax.hist(u_after, bins=200, alpha=0.5, label="after SINAREQ", density=True)
    for lv in levels:
        ax.axvline(lv, color="k", lw=0.6, ls=":")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("normalized weight u (quantization levels dotted)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper right")  # "best" searches 200 bins and every level line: slow, and warns
    return ax


def save_run_plots(run_dir: Path, plan, history, layers, hist_layer, u_before, config) -> None:
    import torch

    if history:
        h = pd.DataFrame(history)
        learned = h.loc[h["phase"] == "sinareq", "step"] if "phase" in h else pd.Series(dtype=float)
        total = int(learned.max()) if len(learned) else 0
        marks = {"regularizer on": config.reg_start * total, "bits frozen": config.freeze_at * total} if total else {}
        fig = new_figure(figsize=(13, 3.4))
        plot_curves(h, next(iter(config.budgets), None), axes=fig.subplots(1, 3), marks=marks)
        fig.tight_layout()
        with atomic_path(run_dir / "curves.png") as tmp:
            fig.savefig(tmp, dpi=110)
    fig = new_figure(figsize=(max(6, 0.35 * len(plan["layers"])), 3.5))
    plot_bits(plan, ax=fig.subplots())
    fig.tight_layout()
    with atomic_path(run_dir / "bits.png") as tmp:
        fig.savefig(tmp, dpi=110)
    if hist_layer:
        m = layers[hist_layer]
        with torch.no_grad():
            u_after = m.quantizer.normalize(m.weight, m.w_scale.abs() + 1e-8).flatten().cpu().tolist()
            bits = int(round(float(m.w_beta)))
            delta = float(m.quantizer.step(torch.tensor(float(bits), dtype=torch.float64)))
        lo = -1.0 if m.quantizer.name == "wrpn" else 0.0
        n = round((1.0 - lo) / delta)
        levels = [lo + k * delta for k in range(n + 1)]
        fig = new_figure(figsize=(7, 3.2))
        plot_weight_histogram(u_before, u_after, levels,
                              f"{hist_layer} at {bits} bits ({m.quantizer.name}): the largest layer whose bits "
                              "were chosen", ax=fig.subplots())
        fig.tight_layout()
        with atomic_path(run_dir / "weights.png") as tmp:
            fig.savefig(tmp, dpi=110)
