"""The Python API over a user's own objects: their trained model, their Dataset or DataLoader, their
loss and metric.

``quantize`` and ``search`` build a ``RunConfig`` / ``SearchConfig`` from keyword arguments and call
``hwsearch.run.run`` / ``hwsearch.study.search`` with the objects, the same functions the command
line calls after it has built a model and data from their names.

    import hwsearch
    result = hwsearch.quantize(model, train_set, test_set, budgets={"bitops": "40M"})
    result.plan["totals"]["bitops"], result.metrics["top1"], result.model
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from .config import RunConfig
from .loaders import as_source
from .run import RunResult, run
from .train import resolve_device
from .units import parse_quantity

__all__ = ["model_ref", "quantize", "search"]


def model_ref(model: nn.Module, name: str | None = None) -> str:
    """What a plan records as the model: ``name`` when given, else ``module:Class`` when that imports back
    to the model's class (so ``hwsearch export``/``apply`` can build it), else the class name."""
    if name:
        return name
    cls = type(model)
    if cls.__module__ not in ("__main__", "builtins") and "<locals>" not in cls.__qualname__:
        try:
            if getattr(importlib.import_module(cls.__module__), cls.__qualname__, None) is cls:
                return f"{cls.__module__}:{cls.__qualname__}"
        except Exception:  # an unimportable module: fall back to the class name
            pass
    return cls.__name__


def _budgets(budgets: Mapping[str, float | str] | None) -> dict[str, float]:
    """Budgets by cost-model name; values as numbers or SI strings ("40M", "40KB" for memory)."""
    out = {}
    for name, value in (budgets or {}).items():
        if isinstance(value, str):
            value = parse_quantity(value, what=f"budgets[{name}]", unit="bytes" if name == "memory" else "count")
        out[name] = float(value)
    return out


def _setup(model, train, test, *, budgets, loss_fn, eval_fn, metric, name, dataset_name, device, num_workers,
           options) -> tuple[RunConfig, object]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (your trained FP32 model), got {type(model).__name__}")
    from . import dist

    device = dist.setup(device)  # under torchrun: join the group first (the batches are sharded by rank)
    source = as_source(train, test, device=resolve_device(device), loss_fn=loss_fn, eval_fn=eval_fn, metric=metric,
                       name=dataset_name, num_workers=num_workers, batch_size=options.get("batch_size", 128))
    config = RunConfig(model=model_ref(model, name), dataset=source.name, budgets=_budgets(budgets), device=device,
                       **options)
    return config, source


def quantize(model: nn.Module, train, test=None, *, budgets: Mapping[str, float | str] | None = None,
             allocator: str = "sinareq", epochs: int | None = None, loss_fn: Callable | None = None,
             eval_fn: Callable | None = None, metric: str | None = None, out: str | Path | None = None,
             name: str | None = None, dataset_name: str | None = None, device: str = "auto", num_workers: int = 0,
             progress: bool = False, **run_options) -> RunResult:
    """Choose per-layer bits for ``model`` within ``budgets`` and train the plan, from the model as given.

    Args:
        model: the trained FP32 model. It is the starting point as it is: it is not retrained, and the
            object is not changed (hwsearch works on copies).
        train, test: a ``Dataset`` (hwsearch batches it, ``batch_size`` from ``run_options``, default 128)
            or a ``DataLoader`` (used as it is), yielding ``(input, target)``; or ``train`` a
            ``hwsearch.TensorData`` and ``test`` None.
        budgets: cost-model name to cap, e.g. ``{"bitops": "40M", "memory": "40KB"}``.
        allocator: ``sinareq`` | ``hessian`` | ``measured``.
        epochs: epochs of training the chosen plan at fixed bits (default 10).
        loss_fn: ``loss_fn(output, target)``; default cross-entropy.
        eval_fn: ``eval_fn(model) -> float``, higher is better; default top-1 on ``test``.
        metric: the name of ``eval_fn``'s value in metrics.json and printouts (default: its ``__name__``).
        out: a run directory to write (plan.json, model.pt, metrics.json, plots), as ``hwsearch run``.
        name: what the plan records as the model (default ``module:Class`` when importable).
        dataset_name: what the plan records as the dataset (default ``custom:<Dataset class>``).
        run_options: any other ``RunConfig`` field (``seed``, ``batch_size``, ``search_epochs``, ``b_min``,
            ``fixed_bits``, ``first_last_bits``, ...).

    Returns:
        ``RunResult``: ``plan`` (``hwsearch.plan/v1`` dict), ``model`` (the trained quantized model),
        ``metrics`` (``top1`` holds the metric, ``metric`` names it; ``fp32_top1`` the given model's).

    Raises:
        ValueError: bad arguments, a loader that does not yield (input, target), an ``eval_fn`` that does
            not return a finite number, a budget below the cheapest plan (``InfeasibleBudget``).
    """
    options = dict(run_options, allocator=allocator, **({"epochs": epochs} if epochs is not None else {}))
    config, source = _setup(model, train, test, budgets=budgets, loss_fn=loss_fn, eval_fn=eval_fn, metric=metric,
                            name=name, dataset_name=dataset_name, device=device, num_workers=num_workers,
                            options=options)
    return run(config, model=model, data=source, out=out, progress=progress)


def search(model, train=None, test=None, *, trials: int | None = None, budgets: Mapping[str, float | str] | None = None,
           loss_fn: Callable | None = None, eval_fn: Callable | None = None, metric: str | None = None,
           out: str | Path | None = None, storage: str | None = None, study: str = "hwsearch",
           objectives: tuple[str, ...] = ("bitops",), sampler: str = "tpe", sampler_seed: int = 0,
           baselines: bool = True, anchor_bits: tuple[float, ...] = (2, 2.5, 3, 4), name: str | None = None,
           dataset_name: str | None = None, device: str = "auto", num_workers: int = 0, progress: bool = False,
           **run_options):
    """An Optuna study of SINAREQ trials on ``model`` (``hwsearch search`` over objects): every trial
    starts from a copy of the given weights; the arguments shared with ``quantize`` mean the same.
    ``search(config)`` with a ``hwsearch.study.SearchConfig`` runs a study by names, as the CLI does.

    Args:
        trials: finished trials the study must hold.
        storage, study: a SQLAlchemy URL and study name (default: SQLite in ``out``).
        objectives, sampler, sampler_seed, baselines, anchor_bits: as ``hwsearch.study.SearchConfig``.

    Returns:
        ``hwsearch.study.SearchResult`` (the study, the number of finished trials); with ``out``, the front
        (front.csv, front.json, trials.csv, pareto.png) is written there too.
    """
    from .study import SearchConfig
    from .study import search as run_search

    if isinstance(model, SearchConfig):
        return run_search(model, out=out, progress=progress)
    if trials is None:
        raise ValueError("trials: give the number of finished trials the study must hold")
    config, source = _setup(model, train, test, budgets=budgets, loss_fn=loss_fn, eval_fn=eval_fn, metric=metric,
                            name=name, dataset_name=dataset_name, device=device, num_workers=num_workers,
                            options=run_options)
    search_config = SearchConfig(base=config, trials=trials, objectives=tuple(objectives), sampler=sampler,
                                 seed=sampler_seed, storage=storage, study_name=study, baselines=baselines,
                                 anchor_bits=tuple(anchor_bits))
    result = run_search(search_config, model=model, data=source, out=out, progress=progress)
    if out and result.study is not None:  # the front and plots beside the trials, as `hwsearch search` writes them
        from .pareto import write_pareto

        write_pareto(result.study, out)
    return result
