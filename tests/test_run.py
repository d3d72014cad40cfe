import json
import math

import pytest
import torch

from hwsearch.cli import main
from hwsearch.config import RunConfig
from hwsearch.plan import PlanError, load_plan
from hwsearch.quant import quant_layers
from hwsearch.rounding import InfeasibleBudget
from hwsearch.run import prepare, run

FAST = ["--fp32-epochs", "8", "--epochs", "8", "--quiet"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import os

    os.environ["HWSEARCH_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["run", "--budget-bitops", "40M", "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_a_complete_run_directory(digits_run):
    for name in ("config.json", "plan.json", "plan.csv", "metrics.json", "history.csv", "curves.png", "bits.png",
                 "weights.png"):
        assert (digits_run / name).is_file(), name
    plan = load_plan(digits_run / "plan.json")
    assert plan["schema"] == "hwsearch.plan/v1" and plan["model"] == "resnet20"
    assert plan["totals"]["bitops"] <= 40e6
    assert json.loads((digits_run / "metrics.json").read_text())["status"] == "complete"
    first, last = plan["layers"][0], plan["layers"][-1]
    assert (first["weight_bits"], first["act_bits"], last["weight_bits"], last["act_bits"]) == (8, 8, 8, 8)


def test_run_searches_then_trains_the_plan(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    history = (digits_run / "history.csv").read_text()
    assert metrics["allocator"] == "sinareq" and 0 < metrics["search_top1"] <= 1 and 0 < metrics["top1"] <= 1
    assert "sinareq" in history and "train-plan" in history  # both phases logged
    plan = load_plan(digits_run / "plan.json")
    assert plan["metrics"]["top1"] == metrics["top1"]  # the plan's top-1 is the trained one


@pytest.mark.parametrize("allocator, record, extra", [
    ("hessian", "hessian_trace", []),
    ("measured", "measured_loss_increase", []),
    # priced on a model first trained at the uniform bits the budget affords, one bitwidth per layer
    ("measured", "measured_loss_increase", ["--measured-qat-epochs", "1", "--tie-bits"]),
])
def test_ilp_allocators_plan_within_budget_and_apply_reproduces_it(allocator, record, extra, tmp_path, capsys):
    out = tmp_path / "h"
    quick = ["--fp32-epochs", "8", "--epochs", "2", "--quiet"]  # the FP32 checkpoint digits_run cached
    assert main(["run", "--allocator", allocator, "--budget-bitops", "20M", "--out", str(out), *quick, *extra]) == 0
    plan = load_plan(out / "plan.json")
    metrics = json.loads((out / "metrics.json").read_text())
    assert plan["totals"]["bitops"] <= 20e6 and metrics["allocator"] == allocator
    assert "search_top1" not in metrics and len(metrics["allocation"][record]) == 20
    bits = {(layer["weight_bits"], layer["act_bits"]) for layer in plan["layers"][1:-1]}
    assert len(bits) > 1  # a mixed plan, not uniform bits
    if extra:
        assert all(w == a for w, a in bits)
        b0 = metrics["allocation"]["measured_at_uniform_bits"]
        assert 2 <= b0 <= 8 and "sensitivity-qat" in (out / "history.csv").read_text()
    capsys.readouterr()
    assert main(["apply", str(out / "plan.json"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["top1"] == pytest.approx(
        plan["metrics"]["top1"], abs=0.5 / 360)


def test_run_then_apply_round_trips(digits_run, capsys):
    plan = load_plan(digits_run / "plan.json")
    out = digits_run.parent / "verify"
    capsys.readouterr()
    assert main(["apply", str(digits_run / "plan.json"), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "verify.json").read_text())
    # run trains the chosen plan with train_plan from the FP32 checkpoint, and apply calls the same
    # function on a model built the same way, with the same seed, data order and recipe: on the CPU
    # the two are the same computation. Half an image (of 360) of slack for floating-point summation order.
    assert result["top1"] == pytest.approx(plan["metrics"]["top1"], abs=0.5 / 360)
    assert "re-trained top-1" in capsys.readouterr().out
    assert (out / "model.pt").is_file() and (out / "plan.json").is_file()  # apply --out keeps its trained model


def test_apply_quantizes_the_plans_layers_at_the_plans_bits(digits_run):
    from hwsearch.models import create_model
    from hwsearch.run import apply_plan

    plan = load_plan(digits_run / "plan.json")
    model = create_model("resnet20", num_classes=10, in_channels=1)
    layers = apply_plan(model, plan)
    by_name = {layer["name"]: layer for layer in plan["layers"]}
    assert set(layers) == set(by_name)
    for name, m in layers.items():
        assert m.bits() == (by_name[name]["weight_bits"], by_name[name]["act_bits"])


def _edit(plan_path, tmp_path, fn):
    plan = json.loads(plan_path.read_text())
    fn(plan)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda p: p.update(schema="hwsearch.plan/v0"), "field schema"),
    (lambda p: p["layers"][3].update(weight_bits=40), "field layers/3/weight_bits"),
    (lambda p: p["totals"].update(bitops=1.0), "field totals/bitops"),
    (lambda p: p.pop("metrics"), "'metrics' is a required property"),
])
def test_bad_plans_name_the_field(digits_run, tmp_path, edit, needle, capsys):
    path = _edit(digits_run / "plan.json", tmp_path, edit)
    with pytest.raises(PlanError, match=needle):
        load_plan(path)
    assert main(["apply", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.split()[-1] in err[0]


def test_a_plan_with_a_layer_removed_names_the_layer_and_the_file(digits_run, tmp_path, capsys):
    path = _edit(digits_run / "plan.json", tmp_path, lambda p: p["layers"].pop(4))  # totals left as they were
    with pytest.raises(PlanError, match="field totals/macs"):
        load_plan(path)  # without the model, only the totals can tell
    assert main(["apply", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(path) in err[0] and "missing layers" in err[0] and "layer1.1.conv2" in err[0]
    assert "totals" not in err[0]


def test_plan_missing_a_layer_or_for_another_model_is_refused(digits_run, tmp_path, capsys):
    def drop_layer(p):
        gone = p["layers"].pop(5)
        for key in ("macs", "bitops", "weight_bytes"):
            p["totals"][key] -= gone[key]
    path = _edit(digits_run / "plan.json", tmp_path, drop_layer)
    assert main(["apply", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "missing layers" in err and "layer1.2.conv1" in err
    path = _edit(digits_run / "plan.json", tmp_path, lambda p: p.update(model="vgg11_bn"))
    assert main(["apply", str(path), "--quiet"]) == 2
    assert "vgg11_bn" in capsys.readouterr().err


def _distance_to_levels(model):
    ds = []
    for m in quant_layers(model).values():
        if m.quantize_input:
            with torch.no_grad():
                t = m.quantizer.normalize(m.weight, m.w_scale.abs() + 1e-8) / m.quantizer.step(m.w_beta)
                ds.append(float((t - t.round()).abs().mean()))
    return sum(ds) / len(ds)


def test_regularizer_leaves_weights_closer_to_their_levels(monkeypatch):
    import hwsearch.run as run_module

    seen = {}
    original = run_module.evaluate

    def spy(model, data, *a, **k):
        seen["distance"] = _distance_to_levels(model)
        return original(model, data, *a, **k)

    monkeypatch.setattr(run_module, "evaluate", spy)
    distances = {}
    for lam in (0.0, 1.0, 10.0):
        run(RunConfig(fixed_bits=3, lambda_w=lam, fp32_epochs=8, epochs=8, seed=1))
        distances[lam] = seen["distance"]
    # Uniformly spread weights sit 0.25 of a step from a level on average. The default (1) pulls
    # mildly; 10 at least halves the distance.
    assert distances[0.0] > 0.15
    assert distances[1.0] < 0.95 * distances[0.0]
    assert distances[10.0] < 0.5 * distances[0.0]


def test_infeasible_budget_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(InfeasibleBudget, match="minimum attainable"):
        prepare(RunConfig(budgets={"bitops": 1e5}))
    assert main(["run", "--budget-bitops", "100K", "--out", str(tmp_path / "r"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "minimum attainable" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", ["abc", "-1", "0", "1.5X", "", "nan"])
def test_bad_budgets_are_refused(text, tmp_path, capsys):
    assert main(["run", "--budget-bitops", text, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-bitops" in err[0]
    assert not (tmp_path / "r").exists()


def test_nan_loss_stops_naming_the_step_and_writes_no_plan(tmp_path, monkeypatch, capsys):
    (tmp_path / "nanmodel.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)\n"
        "        self.mid = nn.Conv2d(8, 8, 3, padding=1)\n"
        "        self.fc = nn.Linear(8, num_classes)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        x = self.mid(torch.relu(self.conv(x)))\n"
        "        out = self.fc(x.mean((2, 3)))\n"
        "        return out * float('nan') if self.training and self.calls > 30 else out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "r"
    assert main(["run", "--model", "nanmodel:Net", "--out", str(out), "--fp32-epochs", "1", "--epochs", "4",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "non-finite at step" in err and "no plan was written" in err
    assert not (out / "plan.json").exists()
    assert json.loads((out / "metrics.json").read_text())["status"].startswith("failed")


def test_ctrl_c_keeps_what_finished_and_writes_no_plan(tmp_path, monkeypatch, capsys):
    import hwsearch.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train_plan", interrupted)
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), *FAST]) == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and math.isfinite(metrics["fp32_top1"])
    assert not (out / "plan.json").exists() and (out / "config.json").exists()
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.gpu
def test_run_on_cuda(tmp_path):
    result = run(RunConfig(device="cuda", fp32_epochs=2, epochs=2, budgets={"bitops": 4e7}), out=tmp_path / "r")
    assert result.plan["totals"]["bitops"] <= 4e7


def test_learned_bits_start_at_the_budget_as_uniform_bits():
    from cost_models import get_cost_model
    from hwsearch.costs import uniform_bits

    table = prepare(RunConfig()).table
    w4 = get_cost_model("bitops")(table, *uniform_bits(table, 4, 4))
    prep = prepare(RunConfig(budgets={"bitops": w4}))
    free_w = [b for b, f in zip(prep.w_init, prep.space.free_w) if f]
    free_a = [b for b, f in zip(prep.a_init, prep.space.free_a) if f]
    assert free_w and free_a
    assert all(b == pytest.approx(4.0, abs=1e-6) for b in free_w + free_a)
    assert prepare(RunConfig()).w_init == prepare(RunConfig(init_bits=8.0)).w_init  # no budget: b_max
    forced = prepare(RunConfig(budgets={"bitops": w4}, init_bits=6.0))
    assert {b for b, f in zip(forced.w_init, forced.space.free_w) if f} == {6.0}
    with pytest.raises(ValueError, match="init_bits"):
        RunConfig(init_bits=9.0)


def test_recalibrate_bn_matches_the_statistics_of_the_model_as_it_is():
    from torch import nn

    from hwsearch.data import TensorData
    from hwsearch.train import recalibrate_bn

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    data = TensorData("t", x, torch.zeros(256, dtype=torch.long), x[:16], torch.zeros(16, dtype=torch.long), 10,
                      mean=(0.5,), std=(0.25,), pad=0, flip=False)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(7.0)  # stale statistics from "another grid"
    bn.running_var.fill_(9.0)
    model.eval()
    assert recalibrate_bn(model, data, batches=4, batch_size=64) == 1
    assert not model.training and bn.momentum == 0.1  # mode and momentum restored
    with torch.no_grad():
        out = model[0](data.normalize(data.x_train))
    assert torch.allclose(bn.running_mean, out.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, out.var((0, 2, 3)), rtol=0.05)


def test_learned_bits_are_kept_on_the_budget_at_every_step():
    """With neither the budget term nor bit pressure, and bits starting at 8, only the projection after
    every step can hold the trained grid within a budget of uniform W3A3 (bits would stay at 8)."""
    from cost_models import get_cost_model
    from hwsearch.costs import uniform_bits

    table = prepare(RunConfig()).table
    w3 = get_cost_model("bitops")(table, *uniform_bits(table, 3, 3))
    result = run(RunConfig(budgets={"bitops": w3}, init_bits=8.0, lambda_b=0.0, lambda_c=0.0, lambda_w=0.0,
                           fp32_epochs=2, epochs=4))
    ratios = [row["cost_ratio"] for row in result.history if "cost_ratio" in row]
    assert len(ratios) >= 3
    assert ratios[0] > 1.0  # the first logging point includes step 0, before any projection
    assert all(r <= 1.0 + 1e-6 for r in ratios[1:])
    assert result.plan["totals"]["bitops"] <= w3 * (1 + 1e-9)


def test_tied_bits_learn_one_bitwidth_per_layer():
    """``tie_bits``: each free layer's input uses its weights' β during learning (one parameter, stepped
    and projected once), so the plan gives a layer's weights and input the same bits, within budget."""
    from cost_models import get_cost_model
    from hwsearch.costs import uniform_bits
    from hwsearch.learn import calibrate, learn_bits, quantize_prepared

    table = prepare(RunConfig()).table
    w3 = get_cost_model("bitops")(table, *uniform_bits(table, 3, 3))
    prep = prepare(RunConfig(budgets={"bitops": w3}, tie_bits=True, max_train=256, batch_size=64, epochs=1))
    layers = quantize_prepared(prep, prep.w_init, prep.a_init, freeze=False)
    calibrate(prep.model, prep.data, 64)
    w, a = learn_bits(prep, layers, epochs=2)
    both = [i for i in range(len(table)) if prep.space.free_w[i] and prep.space.free_a[i]]
    assert both and all(layers[table.names[i]].a_beta is layers[table.names[i]].w_beta for i in both)
    assert [w[i] for i in both] == [a[i] for i in both]
    assert get_cost_model("bitops")(table, w, a) <= w3 * (1 + 1e-9)
