import os

import numpy as np
import pytest
import torch

from hwsearch.cli import main
from hwsearch.config import RunConfig
from hwsearch.export import export_onnx, load_quantized, onnx_top1
from hwsearch.learn import load_data
from hwsearch.run import run
from hwsearch.train import evaluate

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

USER_MODEL = (
    "import torch, torch.nn as nn\n"
    "class Small(nn.Module):\n"
    "    def __init__(self, num_classes=10, in_channels=1):\n"
    "        super().__init__()\n"
    "        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)\n"
    "        self.body = nn.Conv2d(16, 16, 3, padding=1)\n"
    "        self.bn = nn.BatchNorm2d(16)\n"
    "        self.head = nn.Linear(16, num_classes)\n"
    "    def forward(self, x):\n"
    "        x = torch.relu(self.bn(self.body(torch.relu(self.stem(x)))))\n"
    "        return self.head(x.mean((2, 3)))\n"
    "def make(num_classes=10, in_channels=1):\n"
    "    return Small(num_classes, in_channels)\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A learned DoReFa ResNet-20 plan and a uniform 3-bit WRPN one on digits, trained briefly."""
    os.environ["HWSEARCH_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    base = tmp_path_factory.mktemp("export")
    fast = {"fp32_epochs": 8, "epochs": 2, "search_epochs": 1}  # the FP32 checkpoint test_run.py caches too
    dorefa = run(RunConfig(budgets={"bitops": 2e7}, **fast), out=base / "dorefa")
    wrpn = run(RunConfig(quantizer="wrpn", fixed_bits=3, lambda_w=0.0, **fast), out=base / "wrpn")
    return {"dorefa": dorefa, "wrpn": wrpn}


def _data(result):
    return load_data(RunConfig(**{k: v for k, v in result.plan["provenance"]["hyperparameters"].items()
                                  if k in RunConfig.__dataclass_fields__}), torch.device("cpu"))


@pytest.mark.parametrize("quantizer", ["dorefa", "wrpn"])
def test_checkpoint_round_trips_to_the_trained_models_outputs(runs, quantizer):
    result = runs[quantizer]
    loaded = load_quantized(result.run_dir)
    data = _data(result)
    x = data.normalize(data.x_test[:256])
    result.model.eval()
    with torch.no_grad():
        want, got = result.model(x), loaded(x)
    # The loaded weights are codes × step, the trained ones s·(2q − 1) (DoReFa) or s·q (WRPN): equal to
    # float32 rounding, and the layers' inputs then differ by ~1e-5. An input within that distance of a
    # PACT rounding boundary can land on the neighbouring level, which moves its image's logits by one
    # activation step's effect (up to a few hundredths): rare. So almost every logit agrees to float
    # precision, predictions agree on nearly every image, and top-1 within one image.
    diff = (got - want).abs()
    assert float(diff.median()) < 1e-4 * float(want.abs().max())
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.99
    assert evaluate(loaded, data) == pytest.approx(result.metrics["top1"], abs=1.0 / len(data.y_test))


@pytest.mark.parametrize("quantizer", ["dorefa", "wrpn"])
def test_onnx_graph_keeps_the_plans_levels_and_accuracy(runs, quantizer, tmp_path):
    from onnx import numpy_helper

    result = runs[quantizer]
    model = load_quantized(result.run_dir)
    info = export_onnx(model, result.plan, tmp_path / "m.onnx")
    proto = onnx.load(info["path"])
    onnx.checker.check_model(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    by_name = {layer["name"]: layer for layer in result.plan["layers"]}
    quantized = [n for n in by_name if f"{n}.weight_quantized" in inits]
    assert len(quantized) == 20
    for name in quantized:
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype.kind == "i" and f"{name}.weight" not in inits  # integers only, no float copy
        assert len(np.unique(codes)) <= 2 ** by_name[name]["weight_bits"]
    assert ops.count("DequantizeLinear") == 20 + ops.count("QuantizeLinear") and ops.count("QuantizeLinear") == 19
    data = _data(result)
    torch_top1, ort_top1 = evaluate(model, data), onnx_top1(info["path"], data)
    assert abs(ort_top1 - torch_top1) <= 0.002
    assert info["bytes"] < info["float_bytes"]


def test_a_users_model_exports_and_its_checkpoint_shrinks_with_the_bits(tmp_path, monkeypatch, capsys):
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sizes = {}
    for bits in (2, 8):
        out = tmp_path / f"w{bits}"
        argv = ["run", "--model", "usermodel:make", "--bits", str(bits), "--lambda-w", "0", "--fp32-epochs", "2",
                "--epochs", "2", "--first-last-bits", "0", "--quiet", "--out", str(out)]
        assert main(argv) == 0
        sizes[bits] = (out / "model.pt").stat().st_size
        capsys.readouterr()
        assert main(["export", str(out), "--format", "onnx", "--verify"]) == 0
        lines = capsys.readouterr().out
        torch_top1 = float(lines.split("PyTorch top-1")[1].split()[0])
        ort_top1 = float(lines.split("ONNX top-1")[1].split()[0])
        assert abs(torch_top1 - ort_top1) <= 0.002 and (out / "model.onnx").is_file()
    assert sizes[2] < sizes[8]


def _one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_bad_exports_are_refused_with_one_line_and_write_nothing(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(["export", str(empty), "--format", "onnx"], "no trained model", capsys)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.pt").write_bytes(b"not a checkpoint")
    _one_line_exit_2(["export", str(damaged), "--format", "onnx"], "damaged", capsys)
    other = tmp_path / "other"
    other.mkdir()
    blob = torch.load(runs["dorefa"].run_dir / "model.pt", weights_only=True)
    blob["plan"]["model"] = "resnet32"  # a model whose layers are not the plan's
    torch.save(blob, other / "model.pt")
    _one_line_exit_2(["export", str(other), "--format", "onnx"], "missing layers", capsys)
    _one_line_exit_2(["export", str(runs["dorefa"].run_dir), "--format", "tflite"], "--format", capsys)
    for d in (empty, damaged, other):
        assert not (d / "model.onnx").exists() and not list(d.glob(".*tmp"))
