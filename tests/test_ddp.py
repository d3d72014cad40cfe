"""One run across processes: torchrun with gloo on the CPU, 2 processes, digits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwsearch.plan import load_plan

pytestmark = pytest.mark.slow

BUDGET = 40e6
RUN = ["--budget-bitops", "40M", "--fp32-epochs", "2", "--epochs", "2", "--search-epochs", "2", "--quiet"]

# Run by torchrun on every rank: a run, then every rank's plan bits and learned state gathered on rank 0.
JOB = '''
import json, os, sys
import torch.distributed as dist
from hwsearch.config import RunConfig
from hwsearch.quant import quant_layers
from hwsearch.run import run

out, seed = sys.argv[1], int(sys.argv[2])
if os.environ.get("KILL_RANK") == os.environ["RANK"]:  # this rank dies (SIGKILL) as bit learning starts
    import hwsearch.run as r
    r.learn_bits = lambda *a, **k: os.kill(os.getpid(), 9)
res = run(RunConfig(budgets={"bitops": 40e6}, fp32_epochs=2, epochs=2, search_epochs=2, seed=seed), out=out)
mine = {"bits": [[layer["weight_bits"], layer["act_bits"]] for layer in res.plan["layers"]],
        "state": {n: [float(m.w_beta), float(m.a_beta), float(m.w_scale), float(m.a_alpha)]
                  for n, m in quant_layers(res.model).items()},
        "top1": res.metrics["top1"], "weight_sum": float(sum(p.double().sum() for p in res.model.parameters()))}
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, mine)
if dist.get_rank() == 0:
    with open(os.path.join(out, "ranks.json"), "w") as f:
        json.dump(ranks, f)
'''


def _env(tmp_path: Path, **extra) -> dict:
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "HWSEARCH_CACHE": os.environ["HWSEARCH_CACHE"], "PYTHONPATH": str(root),
            "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args: list[str], tmp_path: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                           *args], cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    os.environ["HWSEARCH_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")  # the suite's cache (conftest)
    home = tmp_path_factory.mktemp("ddp")
    (home / "job.py").write_text(JOB)
    proc = _torchrun(["job.py", str(home / "run"), "0"], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home


def test_every_rank_holds_the_same_plan_and_learned_state(ddp_run):
    ranks = json.loads((ddp_run / "run" / "ranks.json").read_text())
    assert len(ranks) == 2
    assert ranks[0] == ranks[1]  # bits, every bitwidth, scale and clip, the metric, the weights: identical
    plan = load_plan(ddp_run / "run" / "plan.json")
    assert plan["totals"]["bitops"] <= BUDGET
    metrics = json.loads((ddp_run / "run" / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["backend"]) == (2, "gloo")


def test_a_two_process_plan_reproduces_under_torchrun_apply(ddp_run):
    proc = _torchrun(["-m", "hwsearch", "apply", "run/plan.json", "--out", "verify", "--quiet"], ddp_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify = json.loads((ddp_run / "verify" / "verify.json").read_text())
    assert verify["world_size"] == 2
    assert verify["top1"] == pytest.approx(verify["plan_top1"], abs=0.5 / 360)


def test_two_processes_land_within_the_seed_spread_of_one(ddp_run, tmp_path):
    """The same global batch (128) in one process, seeds 0-2; the 2-process run's top-1 lies in their range
    widened by the range itself (three seeds understate the spread). Measured when written: one process
    95.0%, 84.7%, 89.7% (a range of 10.3 points on the 360 test digits after 2+2 epochs), two processes 91.9%."""
    from hwsearch.config import RunConfig
    from hwsearch.run import run

    singles = [run(RunConfig(budgets={"bitops": BUDGET}, fp32_epochs=2, epochs=2, search_epochs=2, seed=s)).metrics["top1"]
               for s in range(3)]
    ranks = json.loads((ddp_run / "run" / "ranks.json").read_text())
    spread = max(singles) - min(singles)
    assert min(singles) - spread <= ranks[0]["top1"] <= max(singles) + spread, (singles, ranks[0]["top1"])


def test_a_killed_rank_ends_the_job_without_a_plan_and_the_command_reruns(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    proc = _torchrun(["job.py", str(tmp_path / "run"), "0"], tmp_path, KILL_RANK="1")
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "plan.json").exists()
    again = _torchrun(["job.py", str(tmp_path / "run"), "0"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_plan(tmp_path / "run" / "plan.json")["totals"]["bitops"] <= BUDGET


def test_a_torchrun_search_finishes_exactly_the_requested_trials(tmp_path):
    proc = _torchrun(["-m", "hwsearch", "search", "--trials", "2", "--no-baselines", "--anchor-bits", "none",
                      "--out", "s", *RUN], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [row.split(",") for row in (tmp_path / "s" / "trials.csv").read_text().splitlines()[1:]]
    assert len(states) == 2 and all("COMPLETE" in row for row in states)
    assert "study hwsearch: 2 finished trials" in proc.stdout and proc.stdout.count("finished trials") == 1


def test_a_world_size_that_does_not_divide_the_batch_is_refused_before_anything_is_written(tmp_path):
    proc = _torchrun(["-m", "hwsearch", "run", "--batch-size", "127", "--out", "o", *RUN], tmp_path)
    assert proc.returncode != 0
    assert "hwsearch: error: --batch-size: the global batch 127 is split over 2 processes" in proc.stderr
    assert not (tmp_path / "o").exists()


QUANTIZE_JOB = '''
import json, os, sys
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset
import hwsearch
from hwsearch.data import load_dataset

d = load_dataset("digits")
x_tr, x_te = d.normalize(d.x_train), d.normalize(d.x_test)
torch.manual_seed(0)
model = hwsearch.create_model("resnet20", num_classes=10, in_channels=1)
res = hwsearch.quantize(model, TensorDataset(x_tr, d.y_train), TensorDataset(x_te, d.y_test),
                        budgets={"bitops": "40M"}, epochs=1, search_epochs=1, out=sys.argv[1])
mine = {"bits": [[l["weight_bits"], l["act_bits"]] for l in res.plan["layers"]], "top1": res.metrics["top1"],
        "world_size": res.metrics["world_size"]}
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, mine)
if dist.get_rank() == 0:
    with open(os.path.join(sys.argv[1], "ranks.json"), "w") as f:
        json.dump(ranks, f)
'''


def test_quantize_over_a_users_dataset_under_torchrun(tmp_path):
    (tmp_path / "job.py").write_text(QUANTIZE_JOB)
    proc = _torchrun(["job.py", str(tmp_path / "q")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "q" / "ranks.json").read_text())
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2
    assert load_plan(tmp_path / "q" / "plan.json")["totals"]["bitops"] <= BUDGET
