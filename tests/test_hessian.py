import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cost_models import get_cost_model, profile
from hwsearch.hessian import hessian_bits, hutchinson_traces, measured_sensitivity, solve_bits
from hwsearch.quant import _PactQuant, mse_clip, weight_quantizers
from hwsearch.rounding import BitSpace, InfeasibleBudget


def _brute_force(options, objective, costs, budgets):
    best, best_value = None, None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        if all(sum(c[i][j] for i, j in enumerate(choice)) <= b for c, b in zip(costs, budgets)):
            value = sum(objective[i][j] for i, j in enumerate(choice))
            if best_value is None or value < best_value - 1e-12:
                best, best_value = choice, value
    return best, best_value


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000), st.floats(0.3, 1.0), st.booleans())
def test_the_integer_program_finds_the_brute_force_optimum(layers, seed, tightness, two_budgets):
    g = torch.Generator().manual_seed(seed)
    bits = [2, 3, 4]
    options = [list(itertools.product(bits, bits)) for _ in range(layers)]
    macs = torch.randint(1, 1000, (layers,), generator=g).tolist()
    # Loss falls with bits at a random rate per layer (like Tr(H)/n·||ΔQ||² ∝ 4^-b).
    sw = torch.rand(layers, generator=g).tolist()
    sa = torch.rand(layers, generator=g).tolist()
    objective = [[sw[i] * 4.0 ** -w + sa[i] * 4.0 ** -a for w, a in options[i]] for i in range(layers)]
    costs = [[[macs[i] * w * a for w, a in options[i]] for i in range(layers)]]
    lo, hi = sum(m * 4 for m in macs), sum(m * 16 for m in macs)
    budgets = [lo + tightness * (hi - lo)]
    if two_budgets:  # a memory-like budget on the weight bits alone
        costs.append([[macs[i] * w for w, _ in options[i]] for i in range(layers)])
        budgets.append(sum(m * 3 for m in macs))
    want, want_value = _brute_force(options, objective, costs, budgets)
    got = solve_bits(options, objective, costs, budgets)
    got_value = sum(objective[i][j] for i, j in enumerate(got))
    assert all(sum(c[i][j] for i, j in enumerate(got)) <= b for c, b in zip(costs, budgets))
    assert got_value == pytest.approx(want_value, rel=1e-9, abs=1e-12), (got, want)


def test_an_impossible_budget_is_refused():
    with pytest.raises(InfeasibleBudget):
        solve_bits([[(2, 2), (3, 3)]], [[1.0, 0.5]], [[[4, 9]]], [3])


def test_hutchinson_matches_the_exact_trace_of_a_quadratic():
    # loss = CE of a linear layer: its Hessian in the weights is known in closed form; compare traces.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    x, y = torch.randn(32, 1, 2, 3), torch.randint(0, 3, (32,))
    params = model[1].weight

    def loss_of(w):
        return nn.functional.cross_entropy(nn.functional.linear(x.flatten(1), w, model[1].bias), y)

    exact = torch.autograd.functional.hessian(loss_of, params.detach()).reshape(18, 18).trace()
    tw, ta = hutchinson_traces(model, ["1"], [(x, y)], samples=400, seed=1)
    assert tw["1"] == pytest.approx(float(exact), rel=0.1)
    assert ta["1"] > 0


def _eval_loss(model, batches) -> float:
    """Mean cross-entropy over the batches in eval mode (the model is left in training mode)."""
    with torch.no_grad():
        model.eval()
        total = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches)
        model.train()
        return float(total) / sum(len(y) for _, y in batches)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Conv2d(1, 4, 3, padding=1)
        self.l1 = nn.Conv2d(4, 4, 3, padding=1)
        self.l2 = nn.Conv2d(4, 4, 3, padding=1)
        self.l3 = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.l2(torch.relu(self.l1(torch.relu(self.l0(x))))))
        return self.l3(x.mean((2, 3)))


@pytest.mark.parametrize("measured, tie", [(False, False), (True, False), (True, True)])
def test_hessian_plan_respects_fixed_layers_and_every_budget(measured, tie):
    torch.manual_seed(0)
    model = _Net()
    table = profile(model, (1, 1, 4, 4))
    n = len(table)
    free = [0 < i < n - 1 for i in range(n)]
    space = BitSpace(free, free, 2, 6)
    w0 = [8.0] * n
    bitops = get_cost_model("bitops")
    budget = bitops(table, [8, 3, 3, 8], [8, 3, 3, 8])
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    (w, a), sens = hessian_bits(model, table, table.names, space, w0, w0, [(bitops, budget)], [(x, y)],
                                quantizer="dorefa", samples=4, measured=measured, tie=tie)
    assert (w[0], a[0], w[-1], a[-1]) == (8, 8, 8, 8)
    assert all(2 <= b <= 6 for b in w[1:-1] + a[1:-1])
    assert bitops(table, w, a) <= budget
    assert set(sens.weight) == set(table.names)
    if tie:
        assert w[1:-1] == a[1:-1]


def test_a_choice_over_the_budget_by_a_rounding_error_is_not_returned():
    """Found by hypothesis in CI: one layer, budget a hair under the (4, 4) option's cost; HiGHS, within
    its feasibility tolerance, returned (4, 4). The answer must be the best choice that fits exactly."""
    options = [list(itertools.product([2, 3, 4], [2, 3, 4]))]
    objective = [[4.0 ** -w + 4.0 ** -a for w, a in options[0]]]
    costs = [[[100 * w * a for w, a in options[0]]]]
    budget = 400 + 0.9999999999999999 * (1600 - 400)
    assert budget < 1600
    got = solve_bits(options, objective, costs, [budget])
    assert options[0][got[0]] in {(3, 4), (4, 3)}


def test_measured_sensitivity_is_the_loss_increase_of_one_quantized_layer():
    torch.manual_seed(0)
    model = _Net()
    xs = [torch.randn(32, 1, 4, 4) for _ in range(2)]
    with torch.no_grad():  # sharp logits, labels the float model predicts: quantizing costs loss
        model.l3.weight.mul_(50)
        batches = [(x, model(x).argmax(1)) for x in xs]
    names = ["l1", "l2"]
    bits = (2, 3, 4, 5, 6)
    sens = measured_sensitivity(model, names, batches, quantizer="dorefa", bits=bits)
    assert model.training  # restored

    def loss():
        return _eval_loss(model, batches)

    base, q = loss(), weight_quantizers.get("dorefa")
    # the raw increases, computed here by hand; the sensitivity is their running max from high bits down
    w = model.l1.weight.detach().clone()
    raw_w = {}
    for b in bits:
        with torch.no_grad():
            model.l1.weight.copy_(q.quantize(w, torch.tensor(float(b)), torch.tensor(q.init_scale(w)))[0])
        raw_w[b] = loss() - base
        with torch.no_grad():
            model.l1.weight.copy_(w)
    assert loss() == base  # the weights were put back
    x0 = torch.relu(model.l0(batches[0][0])).detach()
    raw_a = {}
    for b in bits:
        alpha = mse_clip(x0, torch.tensor(float(b)), False)
        h = model.l1.register_forward_pre_hook(lambda m, a, al=alpha, b=b: (
            _PactQuant.apply(a[0], al, torch.tensor(float(b)), False),))
        raw_a[b] = loss() - base
        h.remove()
    for raw, got in ((raw_w, sens.weight["l1"]), (raw_a, sens.act["l1"])):
        for b in bits:
            assert got[b] == pytest.approx(max(0.0, *(raw[c] for c in bits if c >= b)), abs=1e-6)
    assert min(abs(raw_w[2]), abs(raw_a[2])) > 5e-5  # 2 bits change the loss: the comparison above tests something
    for table in (sens.weight, sens.act):
        for n in names:
            assert all(table[n][b] >= table[n][b + 1] >= 0 for b in bits[:-1])


def test_measured_sensitivity_on_a_trained_model_is_the_loss_change_of_one_layer_moved():
    """On a quantized model (every layer at 3 bits), Ω_l(b) is the loss change when layer l alone moves
    to b bits, computed here by hand: 0 at the trained bits, a cost (≥ 0) below them and a gain (≤ 0)
    above, non-increasing in b; the bits and the training mode are put back; the image input (first
    layer) is never priced."""
    from hwsearch.hessian import measured_sensitivity_trained
    from hwsearch.quant import quant_layers, quantize_model

    torch.manual_seed(0)
    model = _Net()
    xs = [torch.randn(32, 1, 4, 4) for _ in range(2)]
    with torch.no_grad():
        model.l3.weight.mul_(50)
        batches = [(x, model(x).argmax(1)) for x in xs]
    names = ["l0", "l1", "l2", "l3"]
    quantize_model(model, names, w_bits=dict.fromkeys(names, 3.0), a_bits=dict.fromkeys(names, 3.0), first_layer="l0")
    layers = quant_layers(model)
    model(xs[0])  # calibrates every PACT clip
    bits = (2, 3, 4, 5)
    sens = measured_sensitivity_trained(model, layers, batches, bits=bits)
    assert model.training and all(float(m.w_beta.detach()) == float(m.a_beta.detach()) == 3.0 for m in layers.values())

    def loss():
        return _eval_loss(model, batches)

    base = loss()
    for n in ("l1", "l2"):
        for kind, beta in (("weight", layers[n].w_beta), ("act", layers[n].a_beta)):
            raw = {}
            for b in bits:
                with torch.no_grad():
                    beta.fill_(float(b))
                raw[b] = loss() - base
                with torch.no_grad():
                    beta.fill_(3.0)
            table = getattr(sens, kind)[n]
            assert raw[3] == pytest.approx(0.0, abs=1e-6) and table[3] == 0.0
            assert table[2] == pytest.approx(max(raw[2], 0.0), abs=1e-6)  # fewer bits: a cost, never a gain
            for b in (4, 5):  # more bits: a gain (running minimum from b0 up), never a cost
                assert table[b] == pytest.approx(min(0.0, *(raw[c] for c in range(4, b + 1))), abs=1e-6)
    assert sens.act["l0"] == dict.fromkeys(bits, 0.0)
    assert any(sens.weight[n][2] > 0 for n in names)  # fewer bits than trained cost loss somewhere
