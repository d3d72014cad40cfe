"""A run: FP32 checkpoint -> allocation (SINAREQ bit learning, or the Hessian allocator) -> the plan
trained at fixed bits from the same FP32 checkpoint with the recipe a uniform baseline gets -> plan.

The plan's top-1 is that of the second phase, which is how DNAS, EdMIPS, HAQ and HAWQ-V3 evaluate a
chosen plan and the only footing on which "learned beats uniform at equal cost" can be judged:
a uniform plan (``fixed_bits``) goes through exactly the same ``train_plan``. ``verify_plan`` (the
``apply`` command) calls ``train_plan`` too, so it reproduces a run's top-1.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cost_models import LayerTable, get_cost_model, profile

from . import dist
from .checkpoint import apply_plan, save_quantized
from .config import RunConfig
from .data import TensorData
from .files import atomic_path, write_json
from .fused import stack_scalars
from .learn import (
    Prepared,
    build_model,
    calibrate,
    learn_bits,
    load_data,
    measure_omega,
    prepare,
    quantize_prepared,
)
from .plan import build_plan, check_plan_matches, check_plan_totals, save_plan
from .quant import take_penalties
from .rounding import project_to_budgets
from .sinareq import strength
from .train import StepHook, evaluate, fit, fp32_checkpoint, recalibrate_bn, resolve_device
from .weights import file_sha256

__all__ = ["RunResult", "allocate", "apply_plan", "fit_plan", "prepare", "quantize_plan", "run", "train_plan",
           "verify_plan"]


@dataclass
class RunResult:
    plan: dict | None
    metrics: dict
    history: list[dict]
    run_dir: Path | None
    model: nn.Module | None = None  # the trained quantized model (deploy it with hwsearch.export)


def quantize_plan(model: nn.Module, data: TensorData, table: LayerTable, w_bits: list[int], a_bits: list[int], *,
                  config: RunConfig) -> dict:
    """Quantize ``model`` in place at a plan's integer bits (per table row), frozen, and set every PACT
    clip from the first training batch. Returns the quantized modules by name."""
    layers = apply_plan(model, {"layers": [{"name": n, "weight_bits": w, "act_bits": a}
                                           for n, w, a in zip(table.names, w_bits, a_bits)],
                                "quantizer": {"weights": config.quantizer}}, check=False)
    calibrate(model, data, config.batch_size)
    return layers


def fit_plan(model: nn.Module, data: TensorData, layers: dict, *, config: RunConfig, progress: bool = False,
             history: list[dict] | None = None, desc: str = "train-plan") -> None:
    """Train a quantized model at its fixed bits: ``config.epochs`` epochs of SGD for the weights and Adam
    for the scales and clips, the regularizer at ``config.training_lambda_w``."""
    lam = config.training_lambda_w
    for m in layers.values():
        m.reg_enabled = lam > 0
    quant_params = [p for m in layers.values() for p in (m.w_scale, m.a_alpha)]
    zero = torch.zeros((), device=data.device)

    def loss(step: int, total: int):
        if lam <= 0:
            return zero, {}
        s = strength(step, total, start=config.reg_start, width=config.reg_width)
        regs = take_penalties(layers)
        reg = stack_scalars(regs).sum() if regs else zero
        return lam * s * reg, {"regularizer": reg.detach()}

    fit(model, data, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
        quant_params=quant_params, lr_quant=config.lr_quant, hook=StepHook(loss), progress=progress, desc=desc,
        history=history, compile=config.compile)


def train_plan(model: nn.Module, data: TensorData, table: LayerTable, w_bits: list[int], a_bits: list[int], *,
               config: RunConfig, progress: bool = False, history: list[dict] | None = None,
               desc: str = "train-plan") -> dict:
    """Quantize ``model`` (float weights: the FP32 checkpoint) at the integer bits of a plan, train it at
    those fixed bits (``fit_plan``), then re-estimate batch-norm statistics. Every plan (uniform,
    learned, Hessian) is trained this way, and ``apply`` does the same.

    Returns:
        The quantized modules by name.
    """
    layers = quantize_plan(model, data, table, w_bits, a_bits, config=config)
    fit_plan(model, data, layers, config=config, progress=progress, history=history, desc=desc)
    recalibrate_bn(model, data, batch_size=config.batch_size, seed=config.seed)
    return layers


def _train_batches(prep: Prepared, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches in the run's seeded order (what sensitivities are measured on)."""
    gen = torch.Generator(device=prep.data.device).manual_seed(prep.config.seed)
    batches = []
    for x, y in prep.data.train_batches(prep.config.batch_size, gen):
        batches.append((x, y))
        if len(batches) == count:
            break
    return batches


def _train_uniform(prep: Prepared, budgets, *, progress: bool = False,
                   history: list[dict] | None = None) -> tuple[int, dict]:
    """Quantize ``prep.model`` (the FP32 checkpoint) at the most uniform bits b0 every budget affords
    (b_min if none does) and train it ``measured_qat_epochs`` epochs at those bits, as a plan trains.
    Returns b0 and the quantized modules by name (what the measured allocator prices bits on)."""
    cfg, space = prep.config, prep.space
    b0 = space.b_min
    for b in range(space.b_min, space.b_max + 1):
        if all(model(prep.table, *space.fill(prep.w_init, prep.a_init, b)) <= cap for model, cap in budgets):
            b0 = b
    w0, a0 = space.fill(prep.w_init, prep.a_init, b0)
    layers = train_plan(prep.model, prep.data, prep.table, [int(b) for b in w0], [int(b) for b in a0],
                        config=replace(cfg, epochs=cfg.measured_qat_epochs), progress=progress, history=history,
                        desc=f"sensitivity-qat-w{b0}a{b0}")
    return b0, layers


def _measured_record(sens) -> dict:
    """A measured sensitivity as metrics.json keeps it: per layer, loss increase by bitwidth."""
    return {n: {"weights": sens.weight[n], "inputs": sens.act[n]} for n in sens.names}


def allocate(prep: Prepared, *, progress: bool = False, history: list[dict] | None = None) -> dict:
    """Choose the plan's integer bits with ``prep.config.allocator`` (uniform bits in fixed-bit mode).

    ``prep.model`` holds the FP32 checkpoint; SINAREQ trains (and so changes) it, the Hessian allocator
    only reads it. Returns ``{"w_bits", "a_bits", "search_top1" (SINAREQ), "seconds"}``.
    """
    cfg, t0 = prep.config, time.time()
    budgets = [(get_cost_model(k), v) for k, v in cfg.budgets.items()]
    out: dict = {}
    if cfg.fixed_bits is not None:
        w, a = project_to_budgets(prep.table, prep.w_init, prep.a_init, prep.space, budgets)
    elif cfg.allocator == "measured" and cfg.measured_qat_epochs > 0:
        from .hessian import measured_sensitivity_trained, plan_bits

        b0, layers = _train_uniform(prep, budgets, progress=progress, history=history)
        sens = measured_sensitivity_trained(prep.model, layers, _train_batches(prep, cfg.measured_batches),
                                            bits=tuple(range(cfg.b_min, cfg.b_max + 1)), loss_fn=prep.data.loss_fn)
        w, a = plan_bits(prep.table, prep.space, prep.w_init, prep.a_init, budgets, sens, tie=cfg.tie_bits)
        out["measured_loss_increase"] = _measured_record(sens)
        out["measured_at_uniform_bits"] = b0
    elif cfg.allocator in ("hessian", "measured"):
        from .hessian import hessian_bits

        measured = cfg.allocator == "measured"
        batches = _train_batches(prep, cfg.measured_batches if measured else cfg.hessian_batches)
        (w, a), sens = hessian_bits(prep.model, prep.table, prep.quantizable, prep.space, prep.w_init, prep.a_init,
                                    budgets, batches, quantizer=cfg.quantizer, samples=cfg.hessian_samples,
                                    seed=cfg.seed, measured=measured, tie=cfg.tie_bits, loss_fn=prep.data.loss_fn)
        if measured:
            out["measured_loss_increase"] = _measured_record(sens)
        else:
            out["hessian_trace"] = {n: {"weights": sens.weight_trace[n], "inputs": sens.act_trace[n]}
                                    for n in sens.names}
    else:
        omega = None
        if cfg.lambda_s > 0:  # the measured accuracy cost of bits, on the FP32 checkpoint
            omega, sens = measure_omega(prep, _train_batches(prep, cfg.measured_batches))
            out["measured_loss_increase"] = _measured_record(sens)
        layers = quantize_prepared(prep, prep.w_init, prep.a_init, freeze=False)
        calibrate(prep.model, prep.data, cfg.batch_size)
        w, a = learn_bits(prep, layers, epochs=cfg.learning_epochs, progress=progress, history=history, omega=omega)
        recalibrate_bn(prep.model, prep.data, batch_size=cfg.batch_size, seed=cfg.seed)
        out["search_top1"] = evaluate(prep.model, prep.data)
    out.update({"w_bits": [int(b) for b in w], "a_bits": [int(b) for b in a], "seconds": time.time() - t0})
    return out


def _u_values(model: nn.Module, name: str, quantizer: str) -> list[float]:
    """One layer's float weights in the quantizer's grid units (the 'before' of weights.png)."""
    from .quant import weight_quantizers

    q = weight_quantizers.get(quantizer)
    w = model.get_submodule(name).weight.detach()
    with torch.no_grad():
        return q.normalize(w, torch.tensor(q.init_scale(w))).flatten().cpu().tolist()


def _fp32_start(config: RunConfig, model: nn.Module, data, pretrained: dict | None, progress: bool) -> dict:
    """The FP32 starting point in ``model``: the user's model or weights as given (``pretrained``: scored,
    not trained, nothing cached), or hwsearch's cached checkpoint (trained when absent).
    Returns ``{"top1", and "path" for a checkpoint}``."""
    if pretrained is not None:
        return {"top1": evaluate(model, data)}
    return fp32_checkpoint(config.model, model, data, epochs=config.fp32_epochs,
                           seed=config.checkpoint_seed, lr=config.lr_fp32, batch_size=config.batch_size,
                           progress=progress)


def run(config: RunConfig, *, model: nn.Module | None = None, data=None, out: str | Path | None = None,
        progress: bool = False) -> RunResult:
    """Choose a plan (``config.allocator``; uniform bits with ``config.fixed_bits``), train it at fixed
    bits from the FP32 start, and return it with its metric (top-1 unless the data carries an ``eval_fn``).

    Args:
        model: the user's FP32 model, used as given (a copy; the object is not changed, not retrained).
            Default: built by ``config.model``, its weights from ``config.weights`` or hwsearch's cached
            FP32 checkpoint.
        data: a source of batches (``TensorData``, or ``hwsearch.loaders.LoaderData`` over a user's Dataset
            or DataLoader). Default: ``config.dataset`` by name.
        out: with it, writes the run directory: config.json, plan.json/plan.csv (atomically, only on
            success), model.pt, metrics.json, history.csv and plots. On Ctrl-C or a non-finite loss,
            metrics.json records the status and no plan is written; the exception propagates.
    """
    t_start = time.time()
    prep = prepare(config, model=model, data=data)
    run_dir = Path(out) if out and dist.is_main() else None  # under torchrun rank 0 alone writes and shows progress
    progress = progress and dist.is_main()
    metric = prep.data.metric
    # A given FP32 model is scored before anything is written: a broken eval_fn or loader fails here.
    ck = _fp32_start(config, prep.model, prep.data, prep.pretrained, progress) if prep.pretrained else None
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", {**config.to_dict(), "resolved_device": str(prep.device)})
    metrics: dict = {"status": "running", "allocator": "uniform" if config.fixed_bits else config.allocator,
                     "metric": metric, "float_layers": prep.float_layers, "world_size": dist.world_size(),
                     "backend": dist.backend()}
    history: list[dict] = []
    try:
        ck = ck or _fp32_start(config, prep.model, prep.data, prep.pretrained, progress)
        metrics["fp32_top1"] = ck["top1"]
        if "path" in ck:
            metrics["fp32_checkpoint"] = ck["path"]
            metrics["fp32_cached"] = ck["cached"]
        else:
            metrics["fp32_weights"] = prep.pretrained
        # The allocator may train prep.model (SINAREQ); the plan then trains from this copy of the FP32 start.
        fp32_model = copy.deepcopy(prep.model) if config.fixed_bits is None else None
        chosen = allocate(prep, progress=progress, history=history)
        w_bits, a_bits = chosen.pop("w_bits"), chosen.pop("a_bits")
        if "search_top1" in chosen:
            metrics["search_top1"] = chosen.pop("search_top1")
        metrics["allocation"] = chosen
        # The plan trains from the FP32 start, on a model built exactly as `apply` builds it.
        model = prep.model if config.fixed_bits is not None else fp32_model
        free = [n for i, n in enumerate(prep.table.names) if prep.space.free_w[i] and n in prep.quantizable] \
            or list(prep.quantizable)
        hist_layer = max(free, key=lambda n: model.get_submodule(n).weight.numel()) if free else None
        u_before = _u_values(model, hist_layer, config.quantizer) if hist_layer else []
        layers = train_plan(model, prep.data, prep.table, w_bits, a_bits, config=config, progress=progress,
                            history=history, desc="train-plan" if config.fixed_bits is None else f"qat-{config.quantizer}")
        top1 = evaluate(model, prep.data)
        metrics.update({"top1": top1, "status": "complete", "seconds": time.time() - t_start})
        plan = build_plan(model=config.model, dataset=prep.data.name if data is not None else config.dataset,
                          table=prep.table, w_bits=w_bits, a_bits=a_bits,
                          quantizer=config.quantizer, cost_model=config.cost_model, budget=config.budgets,
                          metrics={"top1": top1, "fp32_top1": ck["top1"], "metric": metric,
                                   **({"search_top1": metrics["search_top1"]} if "search_top1" in metrics else {})},
                          seed=config.seed, hyperparameters=config.to_dict(),
                          preprocessing=getattr(prep.data, "preprocessing", None), weights=prep.pretrained,
                          float_layers=prep.float_layers)
        for name, value in config.budgets.items():
            metrics[f"cost_{name}"] = get_cost_model(name)(prep.table, w_bits, a_bits)
            metrics[f"budget_{name}"] = value
        if run_dir:
            save_plan(plan, run_dir / "plan.json")
            save_quantized(model, plan, run_dir / "model.pt", num_classes=prep.data.num_classes)
            _write_outputs(run_dir, metrics, history)
            _write_plots(run_dir, plan, history, layers, hist_layer, u_before, config)
        return RunResult(plan, metrics, history, run_dir, model)
    except BaseException as exc:
        metrics["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc}"
        if run_dir:
            _write_outputs(run_dir, metrics, history)
        raise


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, default=str)


def _write_outputs(run_dir: Path, metrics: dict, history: list[dict]) -> None:
    import pandas as pd

    _write_json(run_dir / "metrics.json", metrics)
    if history:
        with atomic_path(run_dir / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)


def _write_plots(run_dir, plan, history, layers, hist_layer, u_before, config) -> None:
    from . import plots

    plots.save_run_plots(run_dir, plan, history, layers, hist_layer, u_before, config)


def _recorded_weights(plan: dict, weights: str | None) -> str | None:
    """The weights file a plan's run started from (``weights`` overrides its path), checked to hold the
    same bytes (sha256) as the file the plan records."""
    recorded = plan["provenance"].get("weights") or {}
    if recorded.get("source") != "file":
        if weights:
            raise ValueError("--weights: this plan was not made from a weights file (its FP32 start was "
                             + ("a model object" if recorded else "hwsearch's own checkpoint") + ")")
        if recorded:
            raise ValueError("apply: this plan started from a model object, not a file; re-apply it from Python "
                             "with verify_plan(plan, model=..., data=...)")
        return None
    path = Path(weights or recorded["path"]).expanduser()
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file (the plan was made from {recorded['path']}; "
                         f"give its copy with --weights FILE)")
    digest = file_sha256(path)
    if digest != recorded["sha256"]:
        raise ValueError(f"--weights {path}: sha256 {digest[:16]}... differs from the plan's "
                         f"{recorded['sha256'][:16]}...: not the weights the plan was made from")
    return str(path)


def verify_plan(plan: dict, *, epochs: int | None = None, device: str = "auto", progress: bool = False,
                out: str | Path | None = None, source: str | Path = "", weights: str | None = None,
                model: nn.Module | None = None, data=None) -> dict:
    """Train the plan at its bits from the same FP32 start with the recipe recorded in its provenance
    (``train_plan``, as ``run`` trained it) and report its metric: with the recorded epochs, on the same
    device type, the run's own value again.

    Args:
        weights: the FP32 weights file (default: the path the plan records); its sha256 must match.
        model, data: the user's model and source of batches, for a plan made from objects.

    Raises:
        ValueError, PlanError: a plan that does not fit the model, or weights other than the plan's.
    """
    hp = dict(plan["provenance"].get("hyperparameters", {}))
    known = set(RunConfig.__dataclass_fields__)
    cfg = RunConfig(**{k: v for k, v in hp.items() if k in known})
    cfg = replace(cfg, model=plan["model"], dataset=plan["dataset"], device=device, budgets={},
                  epochs=epochs or cfg.epochs,
                  weights=_recorded_weights(plan, weights) if model is None else cfg.weights)
    dev = resolve_device(dist.setup(device))
    progress = progress and dist.is_main()
    dist.local_batch(cfg.batch_size)
    data = load_data(cfg, dev) if data is None else data.to(dev)
    model, pretrained = build_model(cfg, data, model)
    table = profile(model, data.input_shape)
    check_plan_matches(plan, table, source)
    check_plan_totals(plan, source)
    ck = _fp32_start(cfg, model, data, pretrained, progress)
    by_name = {layer["name"]: layer for layer in plan["layers"]}
    train_plan(model, data, table, [by_name[n]["weight_bits"] for n in table.names],
               [by_name[n]["act_bits"] for n in table.names], config=cfg, progress=progress, desc="apply")
    top1 = evaluate(model, data)
    result = {"top1": top1, "plan_top1": plan["metrics"].get("top1"), "fp32_top1": ck["top1"], "epochs": cfg.epochs,
              "metric": data.metric, "world_size": dist.world_size()}
    if out and dist.is_main():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        trained = {**plan, "metrics": {**plan["metrics"], "top1": top1}}
        save_plan(trained, out / "plan.json")
        save_quantized(model, trained, out / "model.pt", num_classes=data.num_classes)
        _write_json(out / "config.json", cfg.to_dict())
        _write_json(out / "verify.json", result)
    return result
