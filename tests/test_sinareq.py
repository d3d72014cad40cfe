import math

import pytest
import torch

from hwsearch.quant import WRPN, DoReFa, _PactQuant, mse_clip
from hwsearch.sinareq import accuracy_cost, regularizer, strength


def _dorefa_weights_at(u: torch.Tensor, m: float = math.tanh(1.0)) -> torch.Tensor:
    """Weights whose DoReFa-normalized values are ``u`` (the largest |tanh w| is m, at u = 1)."""
    w = torch.atanh((2 * u - 1) * m)
    return torch.cat([w, torch.tensor([1.0], dtype=u.dtype)])  # anchors max|tanh w| = m


def _levels(q, bits):
    delta = float(q.step(torch.tensor(float(bits), dtype=torch.float64)))
    lo = -1.0 if isinstance(q, WRPN) else 0.0
    n = round((1 - lo) / delta)
    return torch.tensor([lo + k * delta for k in range(n + 1)], dtype=torch.float64), delta


def _weights_at(q, u, scale):
    return _dorefa_weights_at(u) if isinstance(q, DoReFa) else u * scale


@pytest.mark.parametrize("q", [DoReFa(), WRPN()], ids=["dorefa", "wrpn"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_regularizer_is_zero_on_every_level_and_positive_between(q, bits):
    scale = torch.tensor(0.7, dtype=torch.float64)
    beta = torch.tensor(float(bits), dtype=torch.float64)
    levels, delta = _levels(q, bits)
    w_on = _weights_at(q, levels, scale)
    assert float(regularizer(w_on, beta, scale, q)) < 1e-12  # sin(pi k) in float64
    # The grid is the quantizer's own: weights on the zeros are left unchanged by quantization.
    w_hat, _ = q.quantize(w_on, beta, scale)
    q_grid = w_hat / scale if isinstance(q, WRPN) else (w_hat / scale + 1) / 2
    assert torch.allclose(q_grid, q.normalize(w_on, scale), atol=1e-9)
    mids = (levels[:-1] + levels[1:]) / 2
    for mid in mids:
        w_mid = _weights_at(q, mid.reshape(1), scale)
        assert float(regularizer(w_mid, beta, scale, q)) > 1e-3 / 2 ** bits


@pytest.mark.parametrize("q", [DoReFa(), WRPN()], ids=["dorefa", "wrpn"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_regularizer_gradient_points_to_the_nearest_level(q, bits):
    scale = torch.tensor(0.7, dtype=torch.float64)
    beta = torch.tensor(float(bits), dtype=torch.float64)
    levels, delta = _levels(q, bits)
    for level in levels[1:-1]:
        for offset in (-0.3 * delta, -0.1 * delta, 0.1 * delta, 0.3 * delta):
            u = (level + offset).reshape(1)
            w = _weights_at(q, u, scale).clone().requires_grad_(True)
            regularizer(w, beta, scale, q).backward()
            step = -w.grad[0]  # gradient descent moves w this way; u grows with w for both quantizers
            assert torch.sign(step) == -torch.sign(torch.tensor(offset)), (float(level), offset)


def test_wrpn_and_dorefa_grids_differ_and_match_their_quantizers():
    # DoReFa at 2 bits: 4 levels on [0, 1]; WRPN at 2 bits: 3 symmetric levels {-1, 0, 1}.
    assert _levels(DoReFa(), 2)[0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert _levels(WRPN(), 2)[0].tolist() == pytest.approx([-1, 0, 1])
    w = torch.linspace(-2, 2, 101, dtype=torch.float64)
    w_hat, _ = WRPN().quantize(w, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert set(w_hat.tolist()) == {-1.0, 0.0, 1.0}


def test_schedule_switches_on_smoothly():
    total = 1000
    assert strength(0, total) < 1e-3
    assert strength(200, total) == pytest.approx(0.5)
    assert strength(500, total) > 0.999
    values = [strength(t, total) for t in range(0, total, 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("signed", [False, True])
def test_pact_custom_backward_matches_autograd(signed):
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(3.4, dtype=torch.float64, requires_grad=True)

    def reference(x, a, b):
        lo = -a if signed else torch.zeros_like(a)
        d = (a - lo) / (2 ** (b + (torch.round(b) - b).detach()) - 1)  # integer bits, straight-through
        t = (torch.maximum(torch.minimum(x, a), lo) - lo) / d
        return lo + d * (t + (torch.round(t) - t).detach())

    g = torch.randn(200, dtype=torch.float64)
    ours = torch.autograd.grad((_PactQuant.apply(x, alpha, beta, signed) * g).sum(), (x, alpha, beta))
    ref = torch.autograd.grad((reference(x, alpha, beta) * g).sum(), (x, alpha, beta))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b)
    assert torch.equal(_PactQuant.apply(x, alpha, beta, signed), reference(x, alpha, beta))


def _pact_mse(x, alpha, bits, signed):
    a = torch.tensor(float(alpha))
    return float((_PactQuant.apply(x, a, torch.tensor(float(bits)), signed) - x).square().mean())


@pytest.mark.parametrize("signed", [False, True])
def test_pact_starting_clip_has_the_least_quantization_error(signed):
    """The starting clip beats the 0.999 quantile (the old choice) and max|x| by a wide margin at
    2 bits on a heavy-tailed layer input, is no worse than its neighbours, and sits near max|x|
    at 8 bits on values with no tail."""
    gen = torch.Generator().manual_seed(0)
    x = -3 * torch.log1p(-torch.rand(200_000, generator=gen))  # exponential, mean 3
    if signed:
        x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    x[:50] *= 20  # a few large activations, as deep residual streams have
    alpha = float(mse_clip(x, 2, signed))
    best = _pact_mse(x, alpha, 2, signed)
    assert best < 0.75 * _pact_mse(x, float(x.abs().quantile(0.999)), 2, signed)
    assert best < 0.2 * _pact_mse(x, float(x.abs().max()), 2, signed)
    step = float(x.abs().max()) / 100
    assert best <= min(_pact_mse(x, alpha - step, 2, signed), _pact_mse(x, alpha + step, 2, signed)) * (1 + 1e-3)
    flat = torch.rand(100_000, generator=gen) * 5
    assert float(mse_clip(flat, 8, False)) == pytest.approx(5.0, rel=0.03)


def test_layer_calibration_uses_the_layers_starting_bits():
    import copy

    from hwsearch.quant import quant_layers, quantize_model

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    x = torch.randn(8, 3, 10, 10)
    x[0, 0, 0, 0] = 100.0  # one outlier: at 2 bits the clip must ignore it, at 8 bits less so
    alphas = {}
    for bits in (2, 8):
        m = copy.deepcopy(model)
        quantize_model(m, ["0", "2"], w_bits={"0": bits, "2": bits}, a_bits={"0": bits, "2": bits}, first_layer="0")
        layer = quant_layers(m)["0"]
        layer.quantize_input = True
        m(x)
        alphas[bits] = float(layer.a_alpha.detach())
        assert layer._signed and alphas[bits] == pytest.approx(float(mse_clip(x, bits, True)))
    assert alphas[2] < alphas[8] < 100.0


def test_accuracy_cost_is_the_measured_table_linear_between_bitwidths():
    # two layers, bitwidths 2..5; the second row is a layer left out (zeros)
    omega = torch.tensor([[0.8, 0.2, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for b, want, slope in ((2.0, 0.8, -0.6), (2.25, 0.65, -0.6), (3.5, 0.125, -0.15), (4.9, 0.005, -0.05),
                           (5.0, 0.0, -0.05)):
        bits = torch.tensor([b, 3.3], requires_grad=True)
        value = accuracy_cost(bits, omega, b_min=2)
        value.backward()
        assert float(value.detach()) == pytest.approx(want)
        assert float(bits.grad[0]) == pytest.approx(slope) and float(bits.grad[1]) == 0.0
