"""Pareto search: an Optuna multi-objective study over SINAREQ strengths.

Each trial samples λ_w, λ_b, λ_c (log scale), a target cost (log-uniform between the all-minimum
and the starting cost; user budgets stay hard caps) and, unless they are learned, activation bits;
runs SINAREQ from the shared cached FP32 checkpoint, then trains the chosen plan at fixed bits; and
stores the plan's bits, budget and metrics with the trial (a few hundred bytes: Optuna's CLI and
optuna-dashboard stay usable; ``plan_of_trial`` rebuilds the full plan file from them and the
study's model). Objectives: maximize top-1, minimize each named cost of the plan.

Workers coordinate through the storage alone. A trial is claimed under a lock (a PostgreSQL
advisory lock, or a file lock beside a SQLite file), so that N workers finish exactly the
requested number of trials between them. Each running trial sends a heartbeat; a trial whose
worker died (even by SIGKILL) goes stale after the grace period, is marked failed, and is
queued again with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback). Finished
trials are never touched.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cost_models import get_cost_model

from . import dist
from .config import RunConfig
from .files import write_json

__all__ = ["SearchConfig", "SearchError", "open_study", "plan_of_trial", "search", "study_table", "trial_record"]

UNIFORM_BASELINE_BITS = (2, 3, 4, 8)


class SearchError(ValueError):
    """A storage that cannot be reached, a study that does not match, or bad search settings."""


@dataclass(frozen=True)
class SearchConfig:
    base: RunConfig                                  # model, data, budgets (hard caps), epochs, ...
    trials: int = 16                                 # finished trials the study must end with
    objectives: tuple[str, ...] = ("bitops",)        # costs to minimize beside maximizing top-1
    sampler: str = "tpe"                             # tpe | nsga2
    seed: int = 0                                    # sampler seed
    storage: str | None = None                       # SQLAlchemy URL; None: sqlite in the run directory
    study_name: str = "hwsearch"
    learn_act_bits: bool = True                      # False: each trial samples uniform activation bits
    lambda_w_range: tuple[float, float] = (0.3, 30.0)  # above ~30 the penalty outweighs the task loss at 2-4 bits
    lambda_b_range: tuple[float, float] = (1e-3, 1.0)
    lambda_c_range: tuple[float, float] = (0.1, 10.0)
    heartbeat_s: int = 10                            # seconds between a running trial's heartbeats
    grace_s: int = 30                                # a trial silent this long is stale: failed, retried
    baselines: bool = True                           # compute uniform W/A 2,3,4,8 once per study
    anchor_bits: tuple[float, ...] = (2, 2.5, 3, 4)  # first trials aim at these (uniform) bitwidths' costs

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SearchError(f"trials: must be at least 1, got {self.trials}")
        if self.sampler not in ("tpe", "nsga2"):
            raise SearchError(f"sampler: expected 'tpe' or 'nsga2', got {self.sampler!r}")
        if not self.objectives:
            raise SearchError("objectives: name at least one cost")
        for name in self.objectives:
            try:
                get_cost_model(name)
            except (KeyError, ValueError) as exc:
                raise SearchError(f"objectives: {exc.args[0] if exc.args else exc}") from None
        for name in ("lambda_w_range", "lambda_b_range", "lambda_c_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise SearchError(f"{name}: need 0 < low <= high, got {(lo, hi)}")
        for b in self.anchor_bits:
            if not self.base.b_min <= b <= self.base.b_max:
                raise SearchError(f"anchor_bits: {b} is outside b_min..b_max ({self.base.b_min}..{self.base.b_max})")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise SearchError("heartbeat_s/grace_s: need 1 <= heartbeat_s < grace_s")

    def study_signature(self) -> dict:
        """What must match for a worker to join an existing study."""
        return {"objectives": ["top1", *self.objectives], "model": self.base.model, "dataset": self.base.dataset,
                "budgets": self.base.budgets}


def _quiet_optuna() -> None:
    """Heartbeats with ask/tell are deliberate here (see the module docstring)."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _storage(config: SearchConfig, out: Path | None):
    import optuna
    import sqlalchemy

    _quiet_optuna()
    url = config.storage
    if url is None:
        if out is None:
            raise SearchError("storage: give a storage URL or a run directory")
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        # Workers started together on a fresh database would race to create Optuna's tables
        # (a UNIQUE failure on alembic_version, or "database is locked"): one creates them at a time.
        with _db_lock(url, "schema"):
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"storage {_redact(url)} cannot be reached: {first}") from None


def _redact(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_study(config: SearchConfig, out: Path | None = None, *, model_info: dict | None = None):
    """Create the study, or join it if it exists with the same objectives, model, data and budgets.

    Raises:
        SearchError: unreachable storage, or an existing study with another signature (the
        message names the difference).
    """
    import optuna

    storage = _storage(config, out)
    signature = config.study_signature()
    directions = ["maximize"] + ["minimize"] * len(config.objectives)

    def make_sampler(seed: int):
        return (optuna.samplers.NSGAIISampler(seed=seed) if config.sampler == "nsga2"
                else optuna.samplers.TPESampler(seed=seed, multivariate=True))

    existing = {s.study_name for s in storage.get_all_studies()}
    if config.study_name in existing:
        # A worker joining a study gets its own sampler seed: with the creator's, two workers that ask
        # at the same moment see the same history and are given the same parameters (duplicate trials).
        import random

        study = optuna.load_study(study_name=config.study_name, storage=storage,
                                  sampler=make_sampler(config.seed + random.SystemRandom().randrange(1, 2**31)))
        theirs = study.user_attrs.get("signature", {})
        for key, ours in signature.items():
            if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(ours, sort_keys=True):
                raise SearchError(f"study {config.study_name!r} exists with {key} {theirs.get(key)}, "
                                  f"not {ours}; use another --study name")
        return study
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, directions=directions,
                                    sampler=make_sampler(config.seed))
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return open_study(config, out, model_info=model_info)
    study.set_user_attr("signature", signature)
    study.set_user_attr("base_config", config.base.to_dict())
    # The model's layer names (the order of every trial's bits), input shape and classes: what
    # plan_of_trial needs to rebuild a trial's plan.
    for key, value in (model_info or {}).items():
        study.set_user_attr(key, value)
    study.set_user_attr("objectives", ["top1", *config.objectives])
    return study


@contextlib.contextmanager
def _db_lock(url: str, name: str):
    """A lock shared by every process that uses the database at ``url``: a PostgreSQL advisory lock
    keyed by ``name``, or one file lock beside a SQLite file (for every name: the file has one
    writer at a time anyway). Other databases get none."""
    if url.startswith("postgresql"):
        import zlib

        import sqlalchemy

        key = zlib.crc32(f"hwsearch:{name}".encode()) & 0x7FFFFFFF  # same in every process
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        from filelock import FileLock

        with FileLock(url[len("sqlite:///"):] + ".lock"):
            yield
    else:
        yield


def _claim_lock(study):
    """Serialize claiming trials across workers: count, then ask, as one step. On databases other
    than PostgreSQL and SQLite there is no cross-worker lock: at most one extra trial per racing worker."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps RDBStorage in a cache
    return _db_lock(str(getattr(storage, "url", "")), f"study:{study.study_name}")


class _Beat:
    """Calls ``beat()`` every ``interval`` seconds in a thread while the block runs."""

    def __init__(self, beat, interval: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(beat, interval), daemon=True)

    def _run(self, beat, interval):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                beat()
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def cost_range(config: SearchConfig, prep) -> tuple[float, float]:
    """The first objective's cost with every free bit at b_min, and at the starting bits."""
    from .rounding import minimum_cost

    model = get_cost_model(config.objectives[0])
    return (minimum_cost(prep.table, prep.w_init, prep.a_init, prep.space, model),
            model(prep.table, prep.w_init, prep.a_init))


def _trial_config(trial, config: SearchConfig, prep) -> RunConfig:
    fields: dict[str, Any] = {
        "lambda_w": trial.suggest_float("lambda_w", *config.lambda_w_range, log=True),
        "lambda_b": trial.suggest_float("lambda_b", *config.lambda_b_range, log=True),
        "lambda_c": trial.suggest_float("lambda_c", *config.lambda_c_range, log=True),
    }
    # Each trial aims at its own cost, log-uniform between the all-minimum and the starting cost,
    # so that the budget term has a target and trials spread along the whole cost axis; a user's
    # --budget-* stays a hard cap on top.
    lowest, highest = cost_range(config, prep)
    fraction = trial.suggest_float("target_fraction", min(1.0, lowest / highest), 1.0, log=True)
    name = config.objectives[0]
    target = max(lowest, fraction * highest)
    budgets = dict(config.base.budgets)
    budgets[name] = min(budgets.get(name, float("inf")), target)
    fields["budgets"] = budgets
    if not config.learn_act_bits:
        fields["act_bits"] = trial.suggest_int("act_bits", config.base.b_min, config.base.b_max)
    return replace(config.base, **fields)


def anchor_cost(bits: float, model, prep) -> float:
    """The cost of uniform W<bits>A<bits> (free layers; fixed ones as they are). Between whole bitwidths,
    where no uniform plan exists, the uniform costs interpolated geometrically: 2.5 is the geometric mean
    of the W2A2 and W3A3 costs (the issue's intermediate budgets, W2.5A2.5)."""
    import math

    def cost(b: int) -> float:
        return model(prep.table, *prep.space.fill(prep.w_init, prep.a_init, b))

    lo, t = math.floor(bits), bits - math.floor(bits)
    if t == 0:
        return cost(lo)
    return math.exp((1 - t) * math.log(cost(lo)) + t * math.log(cost(lo + 1)))


def _enqueue_anchors(study, config: SearchConfig, prep) -> None:
    """Queue, once per study, a trial at the cost of each bitwidth in ``config.anchor_bits`` (uniform
    W<b>A<b>, or between two of them for a fractional b: see ``anchor_cost``) with the base strengths
    (clipped to the sampled ranges).

    Random start-up trials rarely land at the cheap end, where the uniform curve holds most of its area;
    between W2A2 and W3A3, where some layers must stay at 2 bits, is where choosing them pays most.
    The sampler takes over after the anchors.
    """
    lowest, highest = cost_range(config, prep)
    model = get_cost_model(config.objectives[0])
    ranges = {"lambda_w": config.lambda_w_range, "lambda_b": config.lambda_b_range, "lambda_c": config.lambda_c_range}
    strengths = {name: min(max(getattr(config.base, name), lo), hi) for name, (lo, hi) in ranges.items()}
    with _claim_lock(study):
        if study.user_attrs.get("anchors_queued") is not None:
            return
        queued = []
        for bits in config.anchor_bits[: config.trials]:
            fraction = anchor_cost(bits, model, prep) / highest * (1 + 1e-9)
            if not lowest / highest <= fraction <= 1.0:
                continue
            params = {**strengths, "target_fraction": fraction}
            if not config.learn_act_bits:
                params["act_bits"] = int(bits)  # a fractional anchor: its weights take the rest
            study.enqueue_trial(params, user_attrs={"anchor_bits": bits})
            queued.append(bits)
        study.set_user_attr("anchors_queued", queued)


def trial_record(plan: dict) -> dict:
    """What a trial stores of its plan: the bits in the study's layer order, the budget and the metrics."""
    return {"w_bits": [layer["weight_bits"] for layer in plan["layers"]],
            "a_bits": [layer["act_bits"] for layer in plan["layers"]],
            "budget": plan["budget"], **{k: v for k, v in plan["metrics"].items() if k.endswith("top1")}}


def study_table(study):
    """The layer table of the study's model at its input shape (profiled again from its stored identity)."""
    from cost_models import profile

    from .models import create_model

    sattrs = study.user_attrs
    if "input_shape" not in sattrs:
        raise SearchError(f"study {study.study_name!r} does not record its model's input shape")
    base = sattrs["base_config"]
    shape = tuple(sattrs["input_shape"])
    model = create_model(base["model"], num_classes=sattrs.get("num_classes", 10), in_channels=shape[1])
    table = profile(model, shape)
    if table.names != sattrs.get("layers", table.names):
        raise SearchError(f"study {study.study_name!r}: the model's layers no longer match the study's")
    return table


def plan_of_trial(study, trial, *, table=None) -> dict:
    """The ``hwsearch.plan/v1`` plan of a finished trial, rebuilt from its stored bits and the study's
    model (``table``: the study's layer table, ``study_table(study)`` when not given).

    Raises:
        SearchError: the trial holds no plan (not finished, or written by another version).
    """
    from .plan import build_plan

    attrs, sattrs = trial.user_attrs, study.user_attrs
    if "w_bits" not in attrs or "input_shape" not in sattrs:
        raise SearchError(f"trial {trial.number} holds no plan")
    base = RunConfig(**{k: v for k, v in sattrs["base_config"].items() if k in RunConfig.__dataclass_fields__})
    table = study_table(study) if table is None else table
    params = {k: v for k, v in trial.params.items() if k in RunConfig.__dataclass_fields__}
    hyper = {**base.to_dict(), **params, "budgets": attrs["budget"]}
    metrics = {k: v for k, v in attrs.items() if k.endswith("top1")}
    return build_plan(model=base.model, dataset=base.dataset, table=table,
                      w_bits=[w if w is not None else 32 for w in attrs["w_bits"]], a_bits=attrs["a_bits"],
                      quantizer=base.quantizer, cost_model=base.cost_model, budget=attrs["budget"], metrics=metrics,
                      seed=base.seed, hyperparameters=hyper)


def _objective_values(plan: dict, config: SearchConfig, table) -> list[float]:
    w = [layer["weight_bits"] or layer["act_bits"] for layer in plan["layers"]]
    a = [layer["act_bits"] for layer in plan["layers"]]
    return [plan["metrics"]["top1"]] + [get_cost_model(name)(table, w, a) for name in config.objectives]


def _baseline_bits(config: SearchConfig) -> list[int]:
    lowest = 2 if config.base.quantizer == "wrpn" else 1
    return [b for b in UNIFORM_BASELINE_BITS if b >= lowest]


def _run_baselines(study, config: SearchConfig, prep, out: Path | None, progress: bool, *, block: bool,
                   model=None, data=None) -> None:
    """Uniform W/A baselines (first/last at 8; plain DoReFa/WRPN + PACT, same epochs) and the FP32 point,
    once per study. Each baseline is claimed by one worker at a time (the claim carries a heartbeat,
    so a dead worker's claim goes stale); with ``block``, wait until every baseline is stored."""

    table = prep.table
    while True:
        chosen = None
        with _claim_lock(study):
            attrs = study.user_attrs
            now = time.time()
            pending = [b for b in _baseline_bits(config) if f"baseline_w{b}" not in attrs]
            if not pending:
                return
            for b in pending:
                claim = attrs.get(f"baseline_claim_w{b}")
                if claim is None or now - claim > config.grace_s:
                    chosen = b
                    study.set_user_attr(f"baseline_claim_w{b}", now)
                    break
        if chosen is None:
            if not block:
                return
            time.sleep(config.heartbeat_s)  # others are computing the rest
            continue
        # First/last at the run's fixed bits; with first_last_bits=0 (the allocator prices them) the
        # baselines keep the usual 8, so that they stay the uniform plans users compare against.
        cfg = replace(config.base, fixed_bits=chosen, budgets={}, lambda_w=0.0,
                      first_last_bits=config.base.first_last_bits or 8)
        key = f"baseline_claim_w{chosen}"
        with _Beat(lambda k=key: study.set_user_attr(k, time.time()), config.heartbeat_s):
            res = _run_all(cfg, model=model, data=data, out=(out / "baselines" / f"w{chosen}a{chosen}") if out else None,
                      progress=progress)
        values = _objective_values(res.plan, config, table)
        n = len(table)
        fp32_values = [res.metrics["fp32_top1"]] + [get_cost_model(name)(table, [32] * n, [32] * n)
                                                    for name in config.objectives]
        study.set_user_attr(f"baseline_w{chosen}", {"label": f"W{chosen}A{chosen}", "bits": chosen, "values": values})
        study.set_user_attr("fp32", {"label": "FP32", "values": fp32_values})


@dataclass
class SearchResult:
    study: Any
    out: Path | None
    completed: int
    ran_here: list[int] = field(default_factory=list)


def search(config: SearchConfig, *, model=None, data=None, out: str | Path | None = None, progress: bool = False,
           trial_callback=None) -> SearchResult:
    """Run (or join, or resume) a study until it holds ``config.trials`` finished trials.

    Args:
        model, data: the user's FP32 model (every trial starts from a copy of it) and source of batches,
            as ``hwsearch.run.run`` takes them; default: built from ``config.base``'s names.
        out: run directory (trial plans, plots; the default SQLite file).
        trial_callback: called as ``fn(trial_number)`` when a trial starts (used by tests).

    Raises:
        SearchError, InfeasibleBudget: before any training.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from .run import prepare

    prep = prepare(config.base, model=model, data=data)  # validates budgets before anything is created
    if not dist.is_main():  # under torchrun: rank 0 talks to the study, every rank trains each trial
        _follow(model, data)
        return SearchResult(None, None, 0, [])
    out = Path(out) if out else None
    if config.storage and not config.storage.startswith("sqlite"):
        _storage(config, None)  # an unreachable server fails here, before anything is created
    if out:
        out.mkdir(parents=True, exist_ok=True)
    study = open_study(config, out, model_info={"layers": list(prep.table.names),
                                                "input_shape": list(prep.table.input_shape),
                                                "num_classes": prep.data.num_classes,
                                                "metric": prep.data.metric})
    if out:
        write_json(out / "search.json",
                   {"storage": _redact(config.storage) if config.storage else f"sqlite:///{(out / 'study.db').resolve()}",
                    "study": config.study_name, "config": asdict(config)}, default=str)
    if config.anchor_bits:
        _enqueue_anchors(study, config, prep)
    if config.baselines:  # take the baselines nobody has taken yet, then go on to trials
        _run_baselines(study, config, prep, out, progress, block=False, model=model, data=data)
    ran: list[int] = []
    bar = tqdm(total=config.trials, desc="trials", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            with _claim_lock(study):
                fail_stale_trials(study)
                c = _counts(study)
                bar.n = min(c["COMPLETE"], config.trials)
                bar.refresh()
                trial = study.ask() if c["COMPLETE"] + c["RUNNING"] < config.trials else None
                if trial is not None:
                    # A trial without any heartbeat never goes stale: beat once before letting go.
                    study._storage.record_heartbeat(trial._trial_id)
            if trial is None:
                if c["COMPLETE"] >= config.trials:
                    break
                time.sleep(config.heartbeat_s)  # others still running: wait, they may go stale
                continue
            if trial_callback:
                trial_callback(trial.number)
            with _Beat(lambda tid=trial._trial_id: study._storage.record_heartbeat(tid), config.heartbeat_s):
                cfg = _trial_config(trial, config, prep)
                trial_dir = out / "trials" / f"{trial.number:04d}" if out else None
                try:
                    res = _run_all(cfg, model=model, data=data, out=trial_dir)
                except KeyboardInterrupt:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                except Exception as exc:  # a failed trial is recorded, the search goes on
                    trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                values = _objective_values(res.plan, config, prep.table)
                try:
                    for key, value in trial_record(res.plan).items():
                        trial.set_user_attr(key, value)
                    study.tell(trial, values)
                except UpdateFinishedTrialError:
                    # Our heartbeat lagged past the grace period and another worker failed this
                    # trial and queued a retry: the retry owns the slot now.
                    continue
                ran.append(trial.number)
    finally:
        bar.close()
    if config.baselines:  # the front is drawn against every baseline: finish or wait for the rest
        _run_baselines(study, config, prep, out, progress, block=True, model=model, data=data)
    dist.broadcast_object(None)  # the other ranks' loop ends
    return SearchResult(study, out, _counts(study)["COMPLETE"], ran)


def _run_all(cfg: RunConfig, *, model, data, out, progress: bool = False):
    """``run`` on every rank: rank 0 sends the trial's config to the others (``_follow``) first."""
    from .run import run

    dist.broadcast_object(cfg)
    return run(cfg, model=model, data=data, out=out, progress=progress)


def _follow(model, data) -> None:
    """The loop of ranks other than 0 in a torchrun search: train each config rank 0 sends (one DDP job per
    trial, as rank 0 runs it) until it sends None. A trial that fails here fails on rank 0 too."""
    from .run import run

    while (cfg := dist.broadcast_object(None)) is not None:
        try:
            run(cfg, model=model, data=data)
        except Exception:  # noqa: S112 - rank 0 records the failure and sends the next trial
            continue
