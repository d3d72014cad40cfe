"""The SINAREQ run: FP32 checkpoint -> learn bits under budgets -> round with a hard
guarantee -> fine-tune at fixed bits -> plan. Also plan verification (``verify_plan``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cost_models import LayerTable, get_cost_model, profile

from .config import RunConfig
from .costs import FLOAT_BITS
from .data import TensorData, load_dataset
from .models import create_model
from .plan import build_plan, check_plan_matches, save_plan
from .quant import quant_layers, quantize_model
from .rounding import BitSpace, budget_bits, budget_shift, check_feasible, project_to_budgets
from .sinareq import bit_pressure, budget_penalty, strength
from .train import StepHook, evaluate, fit, fp32_checkpoint, recalibrate_bn, resolve_device

__all__ = ["RunResult", "apply_plan", "prepare", "run", "verify_plan"]


@dataclass
class Prepared:
    """Everything a run needs before training: data on the device, the model, its table, the bit space."""

    config: RunConfig
    data: TensorData
    model: nn.Module
    table: LayerTable
    quantizable: list[str]
    space: BitSpace
    w_init: list[float]
    a_init: list[float]
    device: torch.device
    float_bits: torch.Tensor | None = None


@dataclass
class RunResult:
    plan: dict | None
    metrics: dict
    history: list[dict]
    run_dir: Path | None


def _load_data(config: RunConfig, device: torch.device) -> TensorData:
    data = load_dataset(config.dataset)
    if config.max_train or config.max_test:
        data = data.subset(config.max_train, config.max_test, seed=0)
    return data.to(device)


def prepare(config: RunConfig) -> Prepared:
    """Load data, build and profile the model, fix the bit space, and check that the budgets are
    attainable, all before any training.

    Raises:
        InfeasibleBudget: a budget below the all-minimum cost (the message names the minimum).
    """
    device = resolve_device(config.device)
    data = _load_data(config, device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.input_shape[1])
    table = profile(model, data.input_shape)
    model.to(device)
    modules = dict(model.named_modules())
    quantizable = [layer.name for layer in table.layers
                   if layer.has_weight and isinstance(modules.get(layer.name), (nn.Conv2d, nn.Linear))]
    weighted = [i for i, layer in enumerate(table.layers) if layer.name in quantizable]
    ends = {weighted[0], weighted[-1]} if weighted and config.first_last_bits else set()
    n = len(table)
    free_w, free_a = [False] * n, [False] * n
    w_init, a_init = [float(FLOAT_BITS)] * n, [float(FLOAT_BITS)] * n
    start = float(config.fixed_bits or config.init_bits or config.b_max)
    for i, layer in enumerate(table.layers):
        if layer.name not in quantizable:
            continue
        if i in ends:
            w_init[i] = a_init[i] = float(config.first_last_bits)
        else:
            w_init[i] = start
            a_init[i] = float(config.act_bits) if config.act_bits else start
            free_w[i] = config.fixed_bits is None
            free_a[i] = config.fixed_bits is None and config.act_bits is None
    if weighted:
        a_init[weighted[0]] = float(config.input_bits)  # the image input
        free_a[weighted[0]] = False
    space = BitSpace(free_w, free_a, config.b_min, config.b_max)
    budgets = [(get_cost_model(k), v) for k, v in config.budgets.items()]
    for m, _ in budgets:
        m.check(table)
    if config.fixed_bits is None:
        check_feasible(table, w_init, a_init, space, budgets)
        if config.init_bits is None and budgets:
            # Start at the budget expressed as uniform bits: training begins at the budget's cost and
            # learning redistributes bits between layers instead of bringing them all down from b_max.
            b = budget_bits(table, w_init, a_init, space, budgets)
            w_init = [b if f else x for x, f in zip(w_init, free_w)]
            a_init = [b if f else x for x, f in zip(a_init, free_a)]
    else:
        for m, b in budgets:
            c = m(table, w_init, a_init)
            if c > b:
                raise ValueError(f"budget {m.name}={b:.4g}: fixed {config.fixed_bits}-bit plan costs {c:.4g} {m.unit}")
    return Prepared(config, data, model, table, quantizable, space, w_init, a_init, device)


def _bit_vectors(prep: Prepared, layers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (continuous) bits as two tensors aligned with the table; layers that are not
    quantized count 32 bits (a constant made once, not per step)."""
    w, a = [], []
    if prep.float_bits is None:
        prep.float_bits = torch.tensor(float(FLOAT_BITS), device=prep.device)
    for layer in prep.table.layers:
        mod = layers.get(layer.name)
        if mod is None:
            w.append(prep.float_bits)
            a.append(prep.float_bits)
        else:
            w.append(mod.w_beta)
            a.append(mod.a_beta if mod.quantize_input else mod.a_beta.detach())
    return torch.stack(w), torch.stack(a)


def _set_bits(layers: dict, table: LayerTable, w: list[float], a: list[float], *, freeze: bool,
              space: BitSpace | None = None) -> None:
    with torch.no_grad():
        for i, layer in enumerate(table.layers):
            mod = layers.get(layer.name)
            if mod is None:
                continue
            mod.w_beta.fill_(w[i])
            mod.a_beta.fill_(a[i])
            mod.w_beta.requires_grad_(not freeze and space is not None and space.free_w[i])
            mod.a_beta.requires_grad_(not freeze and space is not None and space.free_a[i])


def _quantize(prep: Prepared, w: list[float], a: list[float]) -> dict:
    names = prep.table.names
    weighted = [n for n in names if n in prep.quantizable]
    quantize_model(prep.model, prep.quantizable, quantizer=prep.config.quantizer,
                   w_bits={n: w[names.index(n)] for n in prep.quantizable},
                   a_bits={n: a[names.index(n)] for n in prep.quantizable},
                   first_layer=weighted[0] if weighted else None)
    layers = quant_layers(prep.model)
    _set_bits(layers, prep.table, w, a, freeze=prep.config.fixed_bits is not None, space=prep.space)
    return layers


def _calibrate(prep: Prepared) -> None:
    """One forward pass on a training batch fixes every PACT clip's start and sign."""
    x = prep.data.normalize(prep.data.x_train[: prep.config.batch_size])
    with torch.no_grad():
        prep.model.eval()
        prep.model(x)
        prep.model.train()


def _train_quantized(prep: Prepared, layers: dict, *, learn: bool, progress: bool, history: list[dict]) -> tuple[list[int], list[int]]:
    """The SINAREQ phase (learn=True) or fixed-bit QAT with the regularizer (learn=False).

    Returns the final integer bits.
    """
    cfg, table, space = prep.config, prep.table, prep.space
    budgets = [(get_cost_model(k), v) for k, v in cfg.budgets.items()]
    pressure_model = get_cost_model(cfg.cost_model)
    learn_w = torch.tensor(space.free_w, device=prep.device, dtype=torch.float32)
    learn_a = torch.tensor(space.free_a, device=prep.device, dtype=torch.float32)
    free_masks = (learn_w.bool(), learn_a.bool())  # made once: the projection runs every step
    # Curves show the average over quantized layers (first/last included).
    shown = torch.tensor([n in layers for n in table.names], device=prep.device, dtype=torch.float32).clamp_min(1e-9)
    quant_params = [p for m in layers.values() for p in (m.w_beta, m.w_scale, m.a_beta, m.a_alpha)]
    # The learned bitwidths (one 0-d parameter per layer and kind), for in-place clamps and shifts.
    free_betas = [m.w_beta for i, n in enumerate(table.names) if space.free_w[i] and (m := layers.get(n))] + \
                 [m.a_beta for i, n in enumerate(table.names) if space.free_a[i] and (m := layers.get(n))]
    for m in layers.values():
        m.reg_enabled = cfg.lambda_w > 0
    state = {"frozen": not learn, "bits": None}
    primary = budgets[0] if budgets else None

    def loss(step: int, total: int):
        s = strength(step, total, start=cfg.reg_start, width=cfg.reg_width)
        reg = torch.stack([m.reg_value for m in layers.values() if m.reg_value is not None]).sum() \
            if cfg.lambda_w > 0 else torch.zeros((), device=prep.device)
        extra = cfg.lambda_w * s * reg
        logs = {"regularizer": reg.detach()}
        w, a = _bit_vectors(prep, layers)
        w64, a64 = w.double(), a.double()
        logs["avg_w_bits"] = (w.detach() * shown).sum() / shown.sum()
        logs["avg_a_bits"] = (a.detach() * shown).sum() / shown.sum()
        if primary:
            # The cost of the grid being trained: round(β) (the plan a freeze now would give, before projection).
            logs["cost_ratio"] = (primary[0].torch(table, w64.detach().round(), a64.detach().round()) / primary[1]).float()
        if not state["frozen"]:
            extra = extra + cfg.lambda_b * s * bit_pressure(table, w64, a64, pressure_model, learn_w.double(),
                                                            learn_a.double()).float()
            if budgets:
                extra = extra + cfg.lambda_c * s * budget_penalty(table, w64, a64, budgets).float()
        return extra, logs

    def after_step(step: int, total: int):
        if state["frozen"] or not free_betas:
            return
        with torch.no_grad():
            torch._foreach_clamp_min_(free_betas, float(cfg.b_min))
            torch._foreach_clamp_max_(free_betas, float(cfg.b_max))
            if budgets:
                # Projection onto the budgets: lower every learned bit by the smallest common shift that
                # brings the grid being trained (round(β)) within every budget. Without it the task
                # loss lifts β above the budget, the network trains on more bits than it may keep, and
                # the freeze takes them away at once (runs in the message of commit 20a208c).
                w, a = _bit_vectors(prep, layers)
                t = budget_shift(table, w, a, *free_masks, budgets, cfg.b_min, cfg.b_max)
                torch._foreach_add_(free_betas, t.float(), alpha=-1.0)
                torch._foreach_clamp_min_(free_betas, float(cfg.b_min))
        if step + 1 >= int(cfg.freeze_at * total):
            w, a = _bit_vectors(prep, layers)
            wi, ai = project_to_budgets(table, w.tolist(), a.tolist(), space, budgets)
            _set_bits(layers, table, [float(b) for b in wi], [float(b) for b in ai], freeze=True)
            state["frozen"], state["bits"] = True, (wi, ai)

    fit(prep.model, prep.data, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        quant_params=quant_params, lr_quant=cfg.lr_quant, hook=StepHook(loss, after_step), progress=progress,
        desc="sinareq" if learn else f"qat-{cfg.quantizer}", history=history, compile=cfg.compile)
    if state["bits"] is None:  # fixed-bit mode, or training ended before the freeze point
        w, a = _bit_vectors(prep, layers)
        state["bits"] = project_to_budgets(table, w.tolist(), a.tolist(), space, budgets)
        _set_bits(layers, table, [float(b) for b in state["bits"][0]], [float(b) for b in state["bits"][1]], freeze=True)
    return state["bits"]


def _u_values(layers: dict, name: str) -> list[float]:
    m = layers[name]
    with torch.no_grad():
        return m.quantizer.normalize(m.weight, m.w_scale.abs() + 1e-8).flatten().cpu().tolist()


def run(config: RunConfig, *, out: str | Path | None = None, progress: bool = False) -> RunResult:
    """Run SINAREQ (or fixed-bit QAT with ``config.fixed_bits``) and return the plan.

    With ``out``, writes the run directory: config.json, plan.json/plan.csv (atomically, only on
    success), metrics.json, history.csv and plots. On Ctrl-C or a non-finite loss, metrics.json
    records the status and no plan is written; the exception propagates.
    """
    t_start = time.time()
    run_dir = Path(out) if out else None
    prep = prepare(config)
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", {**config.to_dict(), "resolved_device": str(prep.device)})
    metrics: dict = {"status": "running"}
    history: list[dict] = []
    try:
        ck = fp32_checkpoint(config.model, prep.model, prep.data, epochs=config.fp32_epochs, seed=config.seed,
                             lr=config.lr_fp32, batch_size=config.batch_size, progress=progress)
        metrics["fp32_top1"] = ck["top1"]
        metrics["fp32_checkpoint"] = ck["path"]
        layers = _quantize(prep, prep.w_init, prep.a_init)
        _calibrate(prep)
        free = [n for i, n in enumerate(prep.table.names) if prep.space.free_w[i]] or list(layers)
        hist_layer = max(free, key=lambda n: layers[n].weight.numel()) if free else None
        u_before = _u_values(layers, hist_layer) if hist_layer else []
        learn = config.fixed_bits is None
        w_bits, a_bits = _train_quantized(prep, layers, learn=learn, progress=progress, history=history)
        recalibrate_bn(prep.model, prep.data, batch_size=config.batch_size, seed=config.seed)
        top1 = evaluate(prep.model, prep.data)
        metrics.update({"top1": top1, "status": "complete", "seconds": time.time() - t_start})
        plan = build_plan(model=config.model, dataset=config.dataset, table=prep.table, w_bits=w_bits, a_bits=a_bits,
                          quantizer=config.quantizer, cost_model=config.cost_model, budget=config.budgets,
                          metrics={"top1": top1, "fp32_top1": ck["top1"]}, seed=config.seed,
                          hyperparameters=config.to_dict())
        for name, value in config.budgets.items():
            metrics[f"cost_{name}"] = get_cost_model(name)(prep.table, w_bits, a_bits)
            metrics[f"budget_{name}"] = value
        if run_dir:
            save_plan(plan, run_dir / "plan.json")
            _write_outputs(run_dir, metrics, history)
            _write_plots(run_dir, plan, history, layers, hist_layer, u_before, config)
        return RunResult(plan, metrics, history, run_dir)
    except BaseException as exc:
        metrics["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc}"
        if run_dir:
            _write_outputs(run_dir, metrics, history)
        raise


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _write_outputs(run_dir: Path, metrics: dict, history: list[dict]) -> None:
    import pandas as pd

    _write_json(run_dir / "metrics.json", metrics)
    if history:
        tmp = run_dir / f".history.csv.{os.getpid()}.tmp"
        pd.DataFrame(history).to_csv(tmp, index=False)
        os.replace(tmp, run_dir / "history.csv")


def _write_plots(run_dir, plan, history, layers, hist_layer, u_before, config) -> None:
    from . import plots

    plots.save_run_plots(run_dir, plan, history, layers, hist_layer, u_before, config)


def apply_plan(model: nn.Module, plan: dict, *, quantizer: str | None = None, first_layer: str | None = None) -> dict:
    """Quantize ``model`` in place at the plan's bits (frozen). Returns the quantized modules by name.

    Raises:
        PlanError: when the plan does not fit the model.
    """
    table = profile(model, tuple(plan["input_shape"]))
    check_plan_matches(plan, table)
    modules = dict(model.named_modules())
    by_name = {layer["name"]: layer for layer in plan["layers"]}
    names = [n for n in table.names if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))
             and by_name[n]["weight_bits"] is not None and by_name[n]["weight_bits"] < FLOAT_BITS]
    quantize_model(model, names, quantizer=quantizer or plan["quantizer"]["weights"],
                   w_bits={n: by_name[n]["weight_bits"] for n in names},
                   a_bits={n: by_name[n]["act_bits"] for n in names},
                   first_layer=first_layer if first_layer is not None else (names[0] if names else None))
    layers = quant_layers(model)
    for m in layers.values():
        m.w_beta.requires_grad_(False)
        m.a_beta.requires_grad_(False)
    return layers


def verify_plan(plan: dict, *, epochs: int | None = None, device: str = "auto", progress: bool = False,
                out: str | Path | None = None) -> dict:
    """Re-train at the plan's bits from the same cached FP32 checkpoint and report top-1.

    The training recipe (epochs, learning rates, regularizer strength, seed, data subset) comes
    from the plan's provenance unless overridden.
    """
    hp = dict(plan["provenance"].get("hyperparameters", {}))
    known = set(RunConfig.__dataclass_fields__)
    cfg = RunConfig(**{k: v for k, v in hp.items() if k in known})
    cfg = replace(cfg, model=plan["model"], dataset=plan["dataset"], device=device, budgets={},
                  epochs=epochs or cfg.epochs)
    dev = resolve_device(device)
    data = _load_data(cfg, dev)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[1])
    table = profile(model, data.input_shape)
    check_plan_matches(plan, table)
    model.to(dev)
    ck = fp32_checkpoint(cfg.model, model, data, epochs=cfg.fp32_epochs, seed=cfg.seed, lr=cfg.lr_fp32,
                         batch_size=cfg.batch_size, progress=progress)
    layers = apply_plan(model, plan, quantizer=plan["quantizer"]["weights"])
    prep = Prepared(cfg, data, model, table, list(layers), BitSpace([False] * len(table), [False] * len(table)),
                    [], [], dev)
    _calibrate(prep)
    for m in layers.values():
        m.reg_enabled = cfg.lambda_w > 0
    history: list[dict] = []
    quant_params = [p for m in layers.values() for p in (m.w_scale, m.a_alpha)]

    def loss(step, total):
        s = strength(step, total, start=cfg.reg_start, width=cfg.reg_width)
        regs = [m.reg_value for m in layers.values() if m.reg_value is not None]
        reg = torch.stack(regs).sum() if regs else torch.zeros((), device=dev)
        return cfg.lambda_w * s * reg, {"regularizer": reg.detach()}

    fit(model, data, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        quant_params=quant_params, lr_quant=cfg.lr_quant, hook=StepHook(loss), progress=progress,
        desc="apply", history=history)
    recalibrate_bn(model, data, batch_size=cfg.batch_size, seed=cfg.seed)
    top1 = evaluate(model, data)
    result = {"top1": top1, "plan_top1": plan["metrics"].get("top1"), "fp32_top1": ck["top1"], "epochs": cfg.epochs}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "verify.json", result)
    return result
