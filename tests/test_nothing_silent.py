"""Nothing silently wrong: layers left in float are listed and priced alike by `cost` and `run`, the
input preprocessing travels with the exported model, errors leave no files, a study without baselines
opens, and the small frictions a new user met."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hwsearch.cli import main
from hwsearch.config import RunConfig

FUNCNET = '''
import torch
import torch.nn.functional as F
from torch import nn


class FuncNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)  # used by F.conv2d in forward
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(F.conv2d(x, self.kernel, padding=1))
        x = torch.relu(self.body(x))
        f = x.flatten(2)
        return self.head((f @ f.transpose(1, 2)).mean(2) / f.shape[2])


def make(num_classes=10, in_channels=1):
    return FuncNet(num_classes, in_channels)
'''
QUICK = ["--fp32-epochs", "2", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A user's folder with funcnet.py; the CLI runs there (it finds the module in the current directory)."""
    path = tmp_path_factory.mktemp("funcnet")
    (path / "funcnet.py").write_text(FUNCNET)
    return path


@pytest.fixture(scope="module")
def uniform_run(home):
    mp = pytest.MonkeyPatch()
    mp.chdir(home)
    mp.setattr(sys, "path", list(sys.path))
    try:
        assert main(["run", "--model", "funcnet:make", "--bits", "4", "--out", "r4", *QUICK]) == 0
    finally:
        mp.undo()
    return home / "r4"


def test_cost_and_run_price_functional_layers_alike_and_list_them(home, uniform_run, monkeypatch, capsys):
    monkeypatch.chdir(home)
    capsys.readouterr()
    assert main(["cost", "--model", "funcnet:make", "--input-shape", "1,1,8,8", "--w-bits", "4", "--a-bits", "4",
                 "--format", "json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    plan = json.loads((uniform_run / "plan.json").read_text())
    metrics = json.loads((uniform_run / "metrics.json").read_text())
    assert cost["totals"]["bitops"] == plan["totals"]["bitops"]
    left = {row["name"]: row for row in cost["float_layers"]}
    assert set(left) == {"(model)", "(model)@matmul"}
    assert "functional convolution" in left["(model)"]["reason"] and "two activations" in left["(model)@matmul"]["reason"]
    assert plan["float_layers"] == cost["float_layers"] == metrics["float_layers"]
    by_name = {row["name"]: row for row in plan["layers"]}
    assert by_name["(model)"]["weight_bits"] == 32 and by_name["head"]["weight_bits"] == 8  # head: the last layer
    assert main(["cost", "--model", "funcnet:make", "--input-shape", "1,1,8,8", "--w-bits", "4", "--a-bits", "4"]) == 0
    table = capsys.readouterr().out
    assert "left in float (32 bits, counted so): 2 layers" in table and "(model)@matmul (matmul, 65,536 MACs)" in table


def test_a_budget_that_only_float_layers_break_says_so(home, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(home)
    capsys.readouterr()
    assert main(["run", "--model", "funcnet:make", "--budget-bitops", "3M", "--out", str(tmp_path / "o"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "minimum attainable" in err and "stay in float at 32 bits" in err and "(model)@matmul" in err
    assert not (tmp_path / "o").exists()


def test_the_exported_model_carries_its_preprocessing(home, uniform_run, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    import onnx
    import torch

    from hwsearch.checkpoint import _read

    plan = json.loads((uniform_run / "plan.json").read_text())
    pre = plan["preprocessing"]
    assert pre["scale"] == pytest.approx(1 / 255) and len(pre["mean"]) == 1 and pre["input_shape"] == [1, 1, 8, 8]
    assert _read(uniform_run / "model.pt")["plan"]["preprocessing"] == pre
    monkeypatch.chdir(home)
    capsys.readouterr()
    assert main(["export", "r4", "--format", "onnx", "--verify", "--include-preprocessing", "--out", "raw.onnx"]) == 0
    lines = {line.split()[0]: float(line.split()[2]) for line in capsys.readouterr().out.splitlines()
             if line.split()[1:2] == ["top-1"]}
    assert abs(lines["ONNX"] - lines["PyTorch"]) <= 1.5 / 360  # raw uint8 pixels in, the same predictions out
    proto = onnx.load(str(home / "raw.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert json.loads({p.key: p.value for p in proto.metadata_props}["hwsearch.plan"])["preprocessing"] == pre
    del torch


def test_export_verify_that_cannot_rebuild_the_data_writes_nothing(tmp_path, monkeypatch, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 50, 0, 200 if cls == "a" else 0)).save(folder / split / cls / f"{i}.png")
    out = tmp_path / "run"
    assert main(["run", "--model", "resnet20", "--dataset", f"imagefolder:{folder}", "--bits", "4",
                 "--batch-size", "4", "--out", str(out), *QUICK]) == 0
    shutil.rmtree(folder)
    capsys.readouterr()
    assert main(["export", str(out), "--format", "onnx", "--verify"]) == 2
    err = capsys.readouterr().err
    assert "cannot rebuild the run's dataset" in err and len(err.strip().splitlines()) == 1
    assert not (out / "model.onnx").exists() and not list(out.glob(".*tmp*"))


def test_a_study_without_baselines_opens_in_pareto_and_the_notebook(home, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(home)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "s"
    assert main(["search", "--model", "funcnet:make", "--trials", "1", "--no-baselines", "--anchor-bits", "none",
                 "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    assert main(["pareto", str(out)]) == 0
    front = json.loads((out / "front.json").read_text())
    assert front["hypervolume"] is None and "no uniform baselines" in front["hypervolume_note"]
    from hwsearch.pareto import load_run

    trials, baselines, objectives = load_run(out)
    assert len(trials) == 1 and baselines.empty and objectives == ["top1", "bitops"]
    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parents[1] / "notebooks", root / "notebooks")
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "HWSEARCH_RUN_DIR": str(out),
           "MPLBACKEND": "Agg"}
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", "notebooks/pareto.ipynb",
                           "--output-dir", str(tmp_path / "nb")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_export_of_a_search_directory_says_where_the_models_are(home, tmp_path, monkeypatch, capsys):
    (tmp_path / "s" / "trials" / "0000").mkdir(parents=True)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "s"), "--format", "onnx"]) == 2
    assert "trials/NNNN/model.pt" in capsys.readouterr().err


def test_the_python_api_defaults_to_the_clis_epochs():
    from hwsearch.cli import build_parser
    from hwsearch.cli_args import config_from_args

    for dataset in ("digits", "cifar10"):
        args = build_parser().parse_args(["run", "--dataset", dataset])
        assert RunConfig(dataset=dataset).epochs == config_from_args(args).epochs == (30 if dataset == "digits" else 10)


def test_messages_name_an_option_once_and_count_epochs_in_words(uniform_run, capsys):
    assert main(["run", "--budget-bitops", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("--budget-bitops") == 1 and "cannot read 'lots'" in err
    from hwsearch.cli_train import _epochs

    assert (_epochs(1), _epochs(2)) == ("1 epoch", "2 epochs")
    from cost_models import get_cost_model

    assert get_cost_model("bitops").unit == "BitOps"
