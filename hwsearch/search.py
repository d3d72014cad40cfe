"""Pareto search: an Optuna multi-objective study over SINAREQ strengths.

Each trial samples λ_w, λ_b, λ_c (log scale) and, unless they are learned, activation bits;
runs SINAREQ from the shared cached FP32 checkpoint; and stores its plan and metrics with the
trial. Objectives: maximize top-1, minimize each named cost of the plan.

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

from .config import RunConfig

__all__ = ["SearchConfig", "SearchError", "open_study", "search"]

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
    lambda_w_range: tuple[float, float] = (1.0, 100.0)
    lambda_b_range: tuple[float, float] = (1e-3, 1.0)
    lambda_c_range: tuple[float, float] = (0.1, 10.0)
    heartbeat_s: int = 10                            # seconds between a running trial's heartbeats
    grace_s: int = 30                                # a trial silent this long is stale: failed, retried
    baselines: bool = True                           # compute uniform W/A 2,3,4,8 once per study

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


def open_study(config: SearchConfig, out: Path | None = None):
    """Create the study, or join it if it exists with the same objectives, model, data and budgets.

    Raises:
        SearchError: unreachable storage, or an existing study with another signature (the
        message names the difference).
    """
    import optuna

    storage = _storage(config, out)
    signature = config.study_signature()
    directions = ["maximize"] + ["minimize"] * len(config.objectives)
    sampler = (optuna.samplers.NSGAIISampler(seed=config.seed) if config.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=config.seed, multivariate=True))
    existing = {s.study_name for s in storage.get_all_studies()}
    if config.study_name in existing:
        study = optuna.load_study(study_name=config.study_name, storage=storage, sampler=sampler)
        theirs = study.user_attrs.get("signature", {})
        for key, ours in signature.items():
            if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(ours, sort_keys=True):
                raise SearchError(f"study {config.study_name!r} exists with {key} {theirs.get(key)}, "
                                  f"not {ours}; use another --study name")
        return study
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, directions=directions,
                                    sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return open_study(config, out)
    study.set_user_attr("signature", signature)
    study.set_user_attr("base_config", config.base.to_dict())
    study.set_user_attr("objectives", ["top1", *config.objectives])
    return study


@contextlib.contextmanager
def _claim_lock(study, out: Path | None):
    """Serialize claiming trials across workers: count, then ask, as one step."""
    storage = study._storage
    url = str(getattr(storage, "url", ""))
    if url.startswith("postgresql"):
        import zlib

        import sqlalchemy

        key = zlib.crc32(f"hwsearch:{study.study_name}".encode()) & 0x7FFFFFFF  # same in every process
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    elif url.startswith("sqlite:///"):
        from filelock import FileLock

        with FileLock(url[len("sqlite:///"):] + ".lock"):
            yield
    else:  # other databases: no cross-worker lock; at most one extra trial per racing worker
        yield


class _Heartbeat:
    def __init__(self, storage, trial_id: int, interval: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)

    def _beat(self, storage, trial_id, interval):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)
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


def _trial_config(trial, config: SearchConfig) -> RunConfig:
    fields: dict[str, Any] = {
        "lambda_w": trial.suggest_float("lambda_w", *config.lambda_w_range, log=True),
        "lambda_b": trial.suggest_float("lambda_b", *config.lambda_b_range, log=True),
        "lambda_c": trial.suggest_float("lambda_c", *config.lambda_c_range, log=True),
    }
    if not config.learn_act_bits:
        fields["act_bits"] = trial.suggest_int("act_bits", config.base.b_min, config.base.b_max)
    return replace(config.base, **fields)


def _objective_values(plan: dict, config: SearchConfig, table) -> list[float]:
    w = [layer["weight_bits"] or layer["act_bits"] for layer in plan["layers"]]
    a = [layer["act_bits"] for layer in plan["layers"]]
    return [plan["metrics"]["top1"]] + [get_cost_model(name)(table, w, a) for name in config.objectives]


def _compute_baselines(study, config: SearchConfig, prep, out: Path | None, progress: bool) -> None:
    """Uniform W/A at 2, 3, 4, 8 bits (first/last at 8) and the FP32 point, once per study."""
    from .run import run

    if "baselines" in study.user_attrs:
        return
    table = prep.table
    rows = []
    fp32 = None
    for bits in UNIFORM_BASELINE_BITS:
        if bits < config.base.b_min and config.base.quantizer == "wrpn":
            continue
        cfg = replace(config.base, fixed_bits=bits, budgets={}, lambda_w=0.0)
        res = run(cfg, out=(out / "baselines" / f"w{bits}a{bits}") if out else None, progress=progress)
        values = _objective_values(res.plan, config, table)
        rows.append({"label": f"W{bits}A{bits}", "bits": bits, "values": values})
        fp32 = res.metrics["fp32_top1"]
    n = len(table)
    fp32_values = [fp32] + [get_cost_model(name)(table, [32] * n, [32] * n) for name in config.objectives]
    study.set_user_attr("baselines", rows)
    study.set_user_attr("fp32", {"label": "FP32", "values": fp32_values})


@dataclass
class SearchResult:
    study: Any
    out: Path | None
    completed: int
    ran_here: list[int] = field(default_factory=list)


def search(config: SearchConfig, *, out: str | Path | None = None, progress: bool = False,
           trial_callback=None) -> SearchResult:
    """Run (or join, or resume) a study until it holds ``config.trials`` finished trials.

    Args:
        out: run directory (trial plans, plots; the default SQLite file).
        trial_callback: called as ``fn(trial_number)`` when a trial starts (used by tests).

    Raises:
        SearchError, InfeasibleBudget: before any training.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from .run import prepare, run

    prep = prepare(config.base)  # validates budgets before anything is created
    out = Path(out) if out else None
    if config.storage and not config.storage.startswith("sqlite"):
        _storage(config, None)  # an unreachable server fails here, before anything is created
    if out:
        out.mkdir(parents=True, exist_ok=True)
    study = open_study(config, out)
    if out:
        (out / "search.json").write_text(json.dumps(
            {"storage": _redact(config.storage) if config.storage else f"sqlite:///{(out / 'study.db').resolve()}",
             "study": config.study_name, "config": asdict(config)}, indent=1, default=str))
    if config.baselines:
        with _claim_lock(study, out):
            study = open_study(config, out)  # reload user attrs written by another worker
            _compute_baselines(study, config, prep, out, progress)
    ran: list[int] = []
    bar = tqdm(total=config.trials, desc="trials", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            with _claim_lock(study, out):
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
            with _Heartbeat(study._storage, trial._trial_id, config.heartbeat_s):
                cfg = _trial_config(trial, config)
                trial_dir = out / "trials" / f"{trial.number:04d}" if out else None
                try:
                    res = run(cfg, out=trial_dir)
                except KeyboardInterrupt:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                except Exception as exc:  # a failed trial is recorded, the search goes on
                    trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                values = _objective_values(res.plan, config, prep.table)
                try:
                    trial.set_user_attr("plan", res.plan)
                    trial.set_user_attr("top1", res.metrics["top1"])
                    study.tell(trial, values)
                except UpdateFinishedTrialError:
                    # Our heartbeat lagged past the grace period and another worker failed this
                    # trial and queued a retry: the retry owns the slot now.
                    continue
                ran.append(trial.number)
    finally:
        bar.close()
    return SearchResult(study, out, _counts(study)["COMPLETE"], ran)
