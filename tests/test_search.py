import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import get_cost_model
from hwsearch.cli import main
from hwsearch.config import RunConfig
from hwsearch.pareto import hypervolume, pareto_mask
from hwsearch.study import SearchConfig, SearchError, _db_lock, open_study, plan_of_trial, search

PG_URL = os.environ.get("HWSEARCH_TEST_PG_URL")
TINY = ["--max-train", "256", "--max-test", "120", "--fp32-epochs", "2", "--epochs", "2", "--batch-size", "64",
        "--quiet"]


def tiny_config(**kw) -> SearchConfig:
    base = RunConfig(max_train=256, max_test=120, fp32_epochs=2, epochs=2, batch_size=64)
    return SearchConfig(base=base, **kw)


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _complete(storage: str, study: str) -> list:
    s = optuna.load_study(study_name=study, storage=storage)
    return [t for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    os.environ["HWSEARCH_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    out = tmp_path_factory.mktemp("search") / "s"
    result = search(tiny_config(trials=3, anchor_bits=(2.5, 3)), out=out)
    return out, result


def test_sqlite_search_finishes_the_requested_trials_with_plans(tiny_search):
    out, result = tiny_search
    assert result.completed == 3 and (out / "study.db").exists()
    complete = _complete(f"sqlite:///{out / 'study.db'}", "hwsearch")
    assert len(complete) == 3
    study = optuna.load_study(study_name="hwsearch", storage=f"sqlite:///{out / 'study.db'}")
    for t in complete:
        plan = plan_of_trial(study, t)  # rebuilt from the trial's bits and the study's model
        assert plan["schema"] == "hwsearch.plan/v1" and t.values[0] == plan["metrics"]["top1"]
        assert (plan["totals"]["bitops"], plan["metrics"]) == (t.values[1], {k: v for k, v in t.user_attrs.items()
                                                                             if k.endswith("top1")})
        assert set(t.params) == {"lambda_w", "lambda_b", "lambda_c", "target_fraction"}
        # Search, then train: the trial's top-1 is the plan trained at fixed bits, within its budget.
        assert "search_top1" in plan["metrics"]
        assert plan["totals"]["bitops"] <= plan["budget"]["bitops"] * (1 + 1e-12)
    from hwsearch.pareto import baselines_frame

    assert baselines_frame(study)["label"].tolist() == ["W2A2", "W3A3", "W4A4", "W8A8", "FP32"]


def test_first_trials_are_anchored_at_the_uniform_costs(tiny_search):
    """Trials 0 and 1 aim at the BitOps between uniform W2A2 and W3A3 (their geometric mean) and at
    uniform W3A3's, with the base strengths; their plans meet those budgets; trial 2 is sampled."""
    from hwsearch.run import prepare

    out, _ = tiny_search
    config = tiny_config(trials=3)
    prep = prepare(config.base)
    bitops = get_cost_model("bitops")
    trials = sorted(_complete(f"sqlite:///{out / 'study.db'}", "hwsearch"), key=lambda t: t.number)
    assert [t.user_attrs.get("anchor_bits") for t in trials] == [2.5, 3, None]
    w2, w3 = (bitops(prep.table, *prep.space.fill(prep.w_init, prep.a_init, b)) for b in (2, 3))
    for t, target in zip(trials[:2], (np.sqrt(w2 * w3), w3)):
        assert t.params["lambda_w"] == config.base.lambda_w and t.params["lambda_c"] == config.base.lambda_c
        assert t.user_attrs["budget"]["bitops"] == pytest.approx(target, rel=1e-6)
        assert t.values[1] <= target * (1 + 1e-6)


def test_anchor_bits_flag_takes_fractions_and_refuses_words(capsys):
    from hwsearch.cli_search import _bits_list

    assert _bits_list("2.5,3,4") == (2.5, 3, 4) and _bits_list("none") == ()
    assert main(["search", "--anchor-bits", "2.5,three", "--trials", "1"]) == 2
    assert "--anchor-bits" in capsys.readouterr().err
    from hwsearch.cli import build_parser

    # the command line's default is the Python API's: the cheapest uniform cost is anchored too
    default = build_parser().parse_args(["search"]).anchor_bits
    assert default == SearchConfig.__dataclass_fields__["anchor_bits"].default == (2, 2.5, 3, 4)


def test_claim_lock_is_held_on_a_sqlite_study(tiny_search):
    """Workers serialize claiming through this lock; Optuna wraps the RDB storage in a cache that
    has no ``url``, which once left every study unlocked (two PostgreSQL workers ran 6 of 5 trials)."""
    from filelock import FileLock, Timeout

    from hwsearch.study import _claim_lock

    out, _ = tiny_search
    study = optuna.load_study(study_name="hwsearch", storage=f"sqlite:///{out / 'study.db'}")
    with _claim_lock(study), pytest.raises(Timeout):
        FileLock(str((out / "study.db").resolve()) + ".lock", timeout=0).acquire()
    FileLock(str((out / "study.db").resolve()) + ".lock", timeout=0).acquire()  # released after the block


def test_workers_started_together_on_a_fresh_database_all_open_the_study(tmp_path):
    """Optuna's RDBStorage creates its tables on first use; four at once on a fresh SQLite file used
    to fail all but one ("database is locked" or a UNIQUE failure on alembic_version)."""
    import threading

    out = tmp_path / "s"
    errors, names = [], []

    def join():
        try:
            names.append(open_study(tiny_config(trials=1), out).study_name)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=join) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and names == ["hwsearch"] * 4
    assert len(optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")) == 1


def test_a_worker_joining_a_study_samples_with_its_own_seed(tmp_path):
    """Two workers on one study used to share the sampler seed: asking at the same moment, with the
    same history, they were given the same parameters (the decisive CPU search ran three pairs of
    identical trials)."""
    from optuna.distributions import FloatDistribution

    out = tmp_path / "s"
    first, second = open_study(tiny_config(trials=2), out), open_study(tiny_config(trials=2), out)
    space = {"lambda_w": FloatDistribution(0.3, 30, log=True)}
    a, b = first.ask(space), second.ask(space)
    assert a.params["lambda_w"] != b.params["lambda_w"]


def test_anchor_bits_outside_the_bit_range_are_refused():
    with pytest.raises(SearchError, match="anchor_bits"):
        tiny_config(anchor_bits=(9,))


def test_search_resumes_and_never_touches_finished_trials(tiny_search, tmp_path):
    out, _ = tiny_search
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    before = {t.number: (t.values, t.params) for t in _complete(f"sqlite:///{copy / 'study.db'}", "hwsearch")}
    result = search(tiny_config(trials=4), out=copy)
    after = {t.number: (t.values, t.params) for t in _complete(f"sqlite:///{copy / 'study.db'}", "hwsearch")}
    assert result.completed == 4 and len(result.ran_here) == 1
    assert {k: after[k] for k in before} == before


def test_pareto_command_writes_front_plots_and_plans(tiny_search, tmp_path, capsys):
    from hwsearch.plan import load_plan

    out, _ = tiny_search
    dest = tmp_path / "p"
    assert main(["pareto", str(out), "--out", str(dest), "--export-plans", str(tmp_path / "plans")]) == 0
    summary = json.loads((dest / "front.json").read_text())
    assert summary["completed"] == 3 and summary["front_size"] >= 1
    assert summary["reference_point"]["top1"] == 0.0 and summary["hypervolume"] >= 0
    for name in ("trials.csv", "baselines.csv", "front.csv", "pareto.png", "hypervolume.png"):
        assert (dest / name).exists(), name
    plans = sorted((tmp_path / "plans").glob("*.json"))
    assert len(plans) == summary["front_size"]
    for p in plans:
        load_plan(p)
    printed = capsys.readouterr().out
    # The front as a table against the uniform curve, the FP32 point and both hypervolumes.
    assert "uniform top1" in printed and "difference" in printed and "FP32: top-1" in printed
    assert "hypervolume: front" in printed and "uniform baselines" in printed


def test_notebook_runs_headless_from_the_repository_root_with_a_relative_run_dir(tiny_search, tmp_path):
    """The README's command, run from a directory standing for the repository root, with a relative
    HWSEARCH_RUN_DIR (the kernel itself runs in notebooks/)."""
    import shutil

    import nbformat

    out, _ = tiny_search
    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parents[1] / "notebooks", root / "notebooks")
    assert main(["pareto", str(out), "--out", str(root / "runs" / "s")]) == 0
    env = {**_env(tmp_path), "HWSEARCH_RUN_DIR": "runs/s", "PWD": str(root)}
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", "notebooks/pareto.ipynb",
                           "--output-dir", "runs/"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    nb = nbformat.read(root / "runs" / "pareto.ipynb", as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(o.get("output_type") == "display_data" for o in outputs) >= 3, "a figure is missing"


def test_trials_stay_small_for_optunas_cli(tiny_search):
    out, _ = tiny_search
    optuna_cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(optuna_cli), "trials", "--storage", f"sqlite:///{out / 'study.db'}", "--study-name",
                           "hwsearch", "-f", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = json.loads(proc.stdout)
    assert len(trials) >= 3
    for t in trials:
        assert len(json.dumps(t)) < 2048, json.dumps(t)[:300]


def test_optuna_dashboard_serves_a_study_that_search_wrote(tiny_search, tmp_path):
    import socket
    import urllib.request

    out, _ = tiny_search
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen([str(dashboard), f"sqlite:///{out / 'study.db'}", "--host", "127.0.0.1", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(tmp_path))

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 60
        while True:
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "optuna-dashboard did not start"
                time.sleep(0.5)
        study = next(s for s in studies if s["study_name"] == "hwsearch")
        detail = get(f"/api/studies/{study['study_id']}")
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert len(complete) >= 3
        assert all(any(a["key"] == "w_bits" for a in t["user_attrs"]) for t in complete)
    finally:
        server.terminate()
        server.wait(timeout=30)


@st.composite
def point_sets(draw):
    k = draw(st.integers(2, 3))
    n = draw(st.integers(1, 25))
    return np.array(draw(st.lists(st.lists(st.integers(0, 6), min_size=k, max_size=k), min_size=n, max_size=n)),
                    dtype=float)


@settings(max_examples=200, deadline=None)
@given(point_sets())
def test_pareto_set_is_exactly_the_non_dominated_points(points):
    mask = pareto_mask(points)
    for i, p in enumerate(points):
        dominated = any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(points) if j != i)
        assert mask[i] == (not dominated)


def test_hypervolume_on_known_fronts():
    ref = np.array([4.0, 4.0])
    assert hypervolume(np.array([[1.0, 1.0]]), ref) == 9.0
    assert hypervolume(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]), ref) == 3 + 2 + 1
    assert hypervolume(np.array([[1.0, 3.0], [2.0, 2.0], [2.5, 2.5]]), ref) == 3 + 2  # dominated point adds 0
    assert hypervolume(np.array([[5.0, 1.0]]), ref) == 0.0  # beyond the reference
    ref3 = np.array([2.0, 2.0, 2.0])
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), ref3) == 1.0
    assert hypervolume(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), ref3) == pytest.approx(2 + 2 - 1)


@settings(max_examples=50, deadline=None)
@given(point_sets())
def test_hypervolume_matches_monte_carlo_free_grid_count(points):
    # On integer points, the dominated volume equals the number of unit cells below the reference
    # that some point dominates.
    ref = np.full(points.shape[1], 7.0)
    import itertools

    cells = 0
    for cell in itertools.product(range(7), repeat=points.shape[1]):
        c = np.array(cell, dtype=float)
        if any(np.all(p <= c) for p in points):
            cells += 1
    assert hypervolume(points, ref) == pytest.approx(cells)


def test_trials_zero_is_refused(tmp_path, capsys):
    assert main(["search", "--trials", "0", "--out", str(tmp_path / "s")]) == 2
    assert "--trials" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_unreachable_storage_is_reported_and_nothing_is_created(tmp_path, capsys):
    url = "postgresql://nobody:secret@127.0.0.1:9/nowhere"
    assert main(["search", "--storage", url, "--out", str(tmp_path / "s"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "secret" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_existing_study_with_other_objectives_is_refused(tiny_search):
    out, _ = tiny_search
    with pytest.raises(SearchError, match=r"objectives \['top1', 'bitops'\], not \['top1', 'bitops', 'memory'\]"):
        search(tiny_config(trials=3, objectives=("bitops", "memory")), out=out)


def _worker(storage: str, study: str, out: Path, trials: int, env, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hwsearch", "search", "--storage", storage, "--study", study, "--trials", str(trials),
           "--out", str(out), "--heartbeat", "1", "--grace", "5", "--no-baselines", *TINY, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_worker_killed_mid_trial_resumes_with_the_same_command(tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "s"
    storage = f"sqlite:///{out / 'study.db'}"
    slower = ("--epochs", "8")  # a trial long enough (several seconds) to be caught running
    proc = _worker(storage, "killed", out, 3, env, slower)
    deadline = time.time() + 240
    before = []
    while time.time() < deadline and proc.poll() is None:  # until one trial is done and the next is running
        time.sleep(0.2)
        if not (out / "study.db").exists():
            continue
        try:
            with _db_lock(storage, "schema"):  # the worker may be creating the tables right now
                s = optuna.load_study(study_name="killed", storage=storage)
        except Exception:
            continue
        trials = s.get_trials(deepcopy=False)
        if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" for t in trials):
            time.sleep(0.5)
            before = [t for t in s.get_trials() if t.state.name == "COMPLETE"]
            proc.send_signal(signal.SIGKILL)
            break
    log = proc.communicate()[0]
    assert before, f"the worker was never caught between a finished and a running trial:\n{log[-3000:]}"
    again = _worker(storage, "killed", out, 3, env, slower)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    s = optuna.load_study(study_name="killed", storage=storage)
    states = [t.state.name for t in s.get_trials()]
    complete = {t.number: t for t in s.get_trials() if t.state.name == "COMPLETE"}
    assert len(complete) == 3 and "FAIL" in states
    for t in before:  # finished before the kill: still there, unchanged
        assert complete[t.number].values == t.values and complete[t.number].params == t.params
    retried = [t for t in complete.values() if "failed_trial" in t.system_attrs]
    assert retried, "the killed trial was not run again"


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="HWSEARCH_TEST_PG_URL not set (.ci/run starts a server)")
def test_two_workers_on_postgresql_finish_exactly_the_requested_trials(tmp_path):
    env = _env(tmp_path)
    study = f"two-{uuid.uuid4().hex[:8]}"
    procs = [_worker(PG_URL, study, tmp_path / f"w{i}", 5, env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    s = optuna.load_study(study_name=study, storage=PG_URL)
    trials = s.get_trials()
    assert [t.state.name for t in trials].count("COMPLETE") == 5, ([t.state.name for t in trials], [t.user_attrs.get("error") for t in trials], logs)
    assert len(trials) == 5, [t.state.name for t in trials]  # nothing extra, nothing failed
    ran = [int(p.name) for i in range(2) for p in (tmp_path / f"w{i}" / "trials").glob("*")]
    assert sorted(ran) == sorted(t.number for t in trials)  # each trial ran once, by one worker
    assert all((tmp_path / f"w{i}" / "trials").exists() for i in range(2)), "one worker did everything"


def test_uniform_curve_is_interpolated_in_log_cost():
    import pandas as pd

    from hwsearch.pareto import uniform_at

    baselines = pd.DataFrame([{"label": "W2A2", "top1": 0.5, "bitops": 10.0}, {"label": "W4A4", "top1": 0.7, "bitops": 1000.0},
                              {"label": "FP32", "top1": 0.9, "bitops": 1e6}])
    got = uniform_at(baselines, ["top1", "bitops"], [10.0, 100.0, 1000.0, 5.0, 2000.0])
    assert got[:3] == pytest.approx([0.5, 0.6, 0.7])
    assert np.isnan(got[3]) and np.isnan(got[4])  # outside the uniform points (FP32 is not one)


def test_baselines_keep_first_and_last_at_8_bits_when_the_search_prices_them(tmp_path):
    """With first_last_bits=0 the trials may choose the first and last layers' bits, but the uniform
    baselines stay the usual plans (first/last at 8), the ones users compare against."""
    from dataclasses import replace

    from hwsearch.costs import uniform_bits
    from hwsearch.pareto import baselines_frame
    from hwsearch.run import prepare

    config = tiny_config(trials=1, anchor_bits=(2,))
    config = replace(config, base=replace(config.base, first_last_bits=0))
    result = search(config, out=tmp_path / "s")
    table = prepare(config.base).table
    bitops = get_cost_model("bitops")
    got = baselines_frame(result.study).set_index("label")["bitops"]
    for b in (2, 3, 4):
        assert got[f"W{b}A{b}"] == pytest.approx(bitops(table, *uniform_bits(table, b, b)))
    trial = _complete(f"sqlite:///{tmp_path / 's' / 'study.db'}", "hwsearch")[0]
    assert trial.values[1] < got["W2A2"]  # the all-2-bit anchor, ends included, costs less than W2A2
