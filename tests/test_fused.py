"""The fused quantizers (hwsearch.fused) against the reference formulas (hwsearch.quant), float64.

Straight-through gradients are not derivatives of the forward function (rounding is flat almost
everywhere), so finite differences cannot check them: they are checked against autograd through the
reference formulas (``round_ste``), exactly, at every bitwidth from 2 to 8. Where the fused functions
are differentiable in the ordinary sense, ``torch.autograd.gradcheck`` checks them too.
"""

from __future__ import annotations

import math

import pytest
import torch

from hwsearch.fused import FusedPact, FusedWeights, pact_scalars
from hwsearch.quant import _PactQuant, quantize_model, weight_quantizers

D = torch.float64
SHAPES = [(4, 3, 3, 3), (6, 4, 1, 1), (5, 7)]


def _weights(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=D) * 0.3 for s in SHAPES]
    # WRPN: scales below max|w| so that some weights lie outside the clip
    scale = torch.tensor([0.2, 0.5, 0.35], dtype=D) if kind == "wrpn" else torch.rand(3, generator=g, dtype=D) + 0.5
    return ws, scale


def _reference(kind, ws, scale, beta, with_penalty):
    q = weight_quantizers.get(kind)
    outs, pens = [], []
    for w, s, b in zip(ws, scale.unbind(), beta.unbind()):
        w_hat, u = q.quantize(w, b, s)
        outs.append(w_hat)
        pens.append(q.penalty(u, b) if with_penalty else torch.zeros((), dtype=D))
    return outs, torch.stack(pens)


@pytest.mark.parametrize("kind", ["dorefa", "wrpn"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("with_penalty", [True, False])
def test_fused_weights_equal_reference_in_value_and_every_gradient(kind, bits, with_penalty):
    ws, scale = _weights(kind, seed=bits)
    beta = torch.tensor([bits + 0.3, bits - 0.2, bits + 0.1], dtype=D)
    g = torch.Generator().manual_seed(100 + bits)
    up = [torch.randn(s, generator=g, dtype=D) for s in SHAPES]
    up_pen = torch.randn(3, generator=g, dtype=D) * 10

    def run(fn):
        w = [x.clone().requires_grad_() for x in ws]
        s, b = scale.clone().requires_grad_(), beta.clone().requires_grad_()
        outs, pen = fn(w, s, b)
        loss = sum((o * u).sum() for o, u in zip(outs, up)) + ((pen * up_pen).sum() if with_penalty else 0)
        loss.backward()
        return [o.detach() for o in outs], pen.detach(), [x.grad for x in w], s.grad, b.grad

    def fused(w, s, b):
        *outs, pen = FusedWeights.apply(kind, with_penalty, s, b, *w)
        return outs, pen

    ref = run(lambda w, s, b: _reference(kind, w, s, b, with_penalty))
    got = run(fused)
    for a, r in zip(got[0], ref[0]):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-14)
    for a, r in zip(got[2], ref[2]):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-9, atol=1e-12)  # scales
    torch.testing.assert_close(got[4], ref[4], rtol=1e-9, atol=1e-12)  # bitwidths
    assert got[4].abs().min() > 0 and got[3].abs().min() > 0  # the gradients compared are not trivially zero


@pytest.fixture(params=["kernel", "aten"])
def pact_path(request, monkeypatch):
    """FusedPact's two CPU implementations: the C++ one-pass kernel and the ATen passes."""
    if request.param == "aten":
        monkeypatch.setenv("HWSEARCH_CPU_KERNELS", "0")
    else:
        from hwsearch.cpu_kernels import pact_ops

        if pact_ops() is None:
            pytest.fail("the fused CPU kernel did not build (a C++ compiler and ninja are needed)")
    return request.param


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_pact_equals_reference_in_value_and_every_gradient(signed, bits, dtype, pact_path):
    g = torch.Generator().manual_seed(bits)
    # 40,000 inputs: more than one of the kernel's chunks, so that its partial sums are exercised
    x = torch.randn(16, 10, 25, 10, generator=g, dtype=dtype) * 1.5 + (0.0 if signed else 0.8)
    alpha = torch.tensor(1.7, dtype=dtype)
    beta = torch.tensor(bits + 0.25, dtype=dtype)
    up = torch.randn(x.shape, generator=g, dtype=dtype)

    def run(fused: bool):
        xx, a, b = x.clone().requires_grad_(), alpha.clone().requires_grad_(), beta.clone().requires_grad_()
        if fused:
            consts = pact_scalars(a.reshape(1), b.reshape(1), torch.tensor([float(signed)], dtype=dtype))
            y = FusedPact.apply(xx, a, b, consts[0], signed)
        else:
            y = _PactQuant.apply(xx, a, b, signed)
        (y * up).sum().backward()
        return y.detach(), xx.grad, a.grad, b.grad

    ref, got = run(False), run(True)
    # float32: the forward may differ by one level where (y − lo)/Δ lands within rounding of a half
    # (the reference divides by Δ, the fused path multiplies by 1/Δ); the sums run in another order.
    exact = dtype is torch.float64
    close = (got[0] - ref[0]).abs() <= 1e-12 if exact else (got[0] - ref[0]).abs() <= 1e-6
    assert close.all() if exact else (~close).sum() <= 2
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12 if exact else 1e-6)
    for a, r in zip(got[2:], ref[2:]):
        torch.testing.assert_close(a, r, rtol=1e-9 if exact else 1e-4, atol=1e-12 if exact else 1e-3)
    assert (x > alpha).any() and (not signed or (x < -alpha).any())  # both sides of the clip are exercised


def test_gradcheck_where_the_fused_functions_are_smooth(pact_path):
    """gradcheck (finite differences, float64) where no rounding is involved: the WRPN penalty in the
    weights and scales, and the PACT output in α for inputs above the clip (ŷ = α there)."""
    ws, scale = _weights("wrpn", seed=0)
    beta = torch.tensor([3.2, 4.0, 5.1], dtype=D)
    w = [x.clone().requires_grad_() for x in ws]
    s = scale.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, *w: FusedWeights.apply("wrpn", True, s, beta, *w)[-1], (s, *w))
    x = torch.linspace(2.0, 3.0, 7, dtype=D)  # all above α
    for signed in (False, True):
        a = torch.tensor(1.3, dtype=D, requires_grad=True)

        def pact(a, signed=signed):
            consts = pact_scalars(a.reshape(1), torch.tensor([4.0], dtype=D), torch.tensor([float(signed)], dtype=D))
            return FusedPact.apply(x, a, torch.tensor(4.0, dtype=D), consts[0], signed)

        assert torch.autograd.gradcheck(pact, (a,))


def test_model_forward_uses_the_fused_path_and_matches_the_reference():
    """A quantized model's forward (prepare_step + fused ops) equals the per-layer reference path in
    output, penalties and every parameter's gradient."""
    from torch import nn

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
        names = ["0", "2", "5"]
        quantize_model(m, names, w_bits=dict.fromkeys(names, 4.3), a_bits=dict.fromkeys(names, 3.2), first_layer="0")
        m.to(D)  # the quantizer parameters too
        for mod in m.modules():
            if hasattr(mod, "reg_enabled"):
                mod.reg_enabled = True
        return m

    x = torch.randn(4, 3, 8, 8, dtype=D)
    fused, ref = build(), build()
    fused(x), ref(x)  # calibration
    out_f = fused(x)
    pen_f = sum(m.reg_value for m in fused.modules() if getattr(m, "reg_value", None) is not None)
    # The reference path: the pre-hook's results are dropped, every layer quantizes on its own.
    for m in ref.modules():
        m._forward_pre_hooks.clear()
    out_r = ref(x)
    pen_r = sum(m.reg_value for m in ref.modules() if getattr(m, "reg_value", None) is not None)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen_f, pen_r, rtol=1e-10, atol=1e-14)
    (out_f.square().sum() + pen_f).backward()
    (out_r.square().sum() + pen_r).backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=n)


def test_scalar_adam_steps_as_torch_adam_including_parameters_without_gradient():
    from hwsearch.optim import ScalarAdam

    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, generator=g, dtype=D)
    mine = [torch.nn.Parameter(v.clone()) for v in start]
    ref = [torch.nn.Parameter(v.clone()) for v in start]
    opt, ref_opt = ScalarAdam(mine, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    for step in range(8):
        grads = torch.randn(5, generator=g, dtype=D)
        for ps in (mine, ref):
            for i, p in enumerate(ps):
                # parameter 1 has no gradient from step 3 on (a frozen bitwidth); parameter 4 only from step 2
                p.grad = None if (i == 1 and step >= 3) or (i == 4 and step < 2) else grads[i].clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(torch.stack([p.detach() for p in mine]), start)


def test_scalar_adam_shared_parameters_move_in_proportion_to_their_gradients():
    """``shared``: those parameters divide by the mean of their second moments (so a constant gradient
    ten times larger moves ten times further); the others step exactly as torch's Adam."""
    from hwsearch.optim import ScalarAdam

    ps = [torch.nn.Parameter(torch.zeros((), dtype=D)) for _ in range(4)]
    ref = torch.nn.Parameter(torch.zeros((), dtype=D))
    opt, ref_opt = ScalarAdam(ps, lr=0.01, shared=ps[:3]), torch.optim.Adam([ref], lr=0.01)
    grads = [0.1, 1.0, -2.0, 0.5]
    for _ in range(5):
        for p, v in zip(ps, grads):
            p.grad = torch.tensor(v, dtype=D)
        ref.grad = torch.tensor(grads[3], dtype=D)
        opt.step()
        ref_opt.step()
    moved = torch.stack([p.detach() for p in ps[:3]])
    rms = math.sqrt(sum(v * v for v in grads[:3]) / 3)
    # constant gradients: Adam's bias-corrected moments are exact, each step is lr·g/rms(shared g)
    torch.testing.assert_close(moved, -0.01 * 5 * torch.tensor(grads[:3], dtype=D) / rms, rtol=1e-6, atol=0)
    torch.testing.assert_close(ps[3].detach(), ref.detach(), rtol=1e-12, atol=1e-12)


def test_the_quantized_forward_pass_compiles_as_one_graph():
    """torch.compile traces the forward pass, pre-hook and fused functions included, without a graph
    break (``torch._dynamo.explain``: dynamo only, nothing compiled to machine code)."""
    from hwsearch.models import create_model
    from hwsearch.quant import quant_layers

    model = create_model("resnet20")
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    quantize_model(model, names, w_bits=dict.fromkeys(names, 4.0), a_bits=dict.fromkeys(names, 4.0),
                   first_layer=names[0])
    for m in quant_layers(model).values():
        m.reg_enabled = True
    x = torch.randn(2, 3, 32, 32)
    model(x)  # calibration (eager)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: model(x).sum())(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [3.4, 24.0, 32.0])
def test_pact_kernel_and_aten_paths_agree_bit_for_bit_in_float32(signed, bits, monkeypatch):
    """The C++ kernel does the ATen path's float operations in the same order: same output, same
    input gradient, sums equal up to summation order. Beyond 2^21 levels (a last layer may keep
    32-bit inputs) the kernel rounds with nearbyint instead of its added constant."""
    from hwsearch.cpu_kernels import pact_ops

    assert pact_ops() is not None, "the fused CPU kernel did not build"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, 16, 16, generator=g) * 2 + (0.0 if signed else 0.5)
    up = torch.randn(x.shape, generator=g)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("HWSEARCH_CPU_KERNELS", env)
        xx = x.clone().requires_grad_()
        a, b = torch.tensor(1.9, requires_grad=True), torch.tensor(bits, requires_grad=True)
        rows = pact_scalars(a.detach().reshape(1), b.detach().reshape(1), torch.tensor([float(signed)]))
        with Calls() as calls:
            y = FusedPact.apply(xx, a, b, rows[0], signed)
            (y * up).sum().backward()
        used = {"hwsearch.pact_forward", "hwsearch.pact_backward"} <= calls.names
        assert used == (env == "1"), calls.names
        outs.append((y.detach(), xx.grad, a.grad, b.grad))
    (yk, gk, ak, bk), (ya, ga, aa, ba) = outs
    assert torch.equal(yk, ya) and torch.equal(gk, ga)
    torch.testing.assert_close(ak, aa, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bk, ba, rtol=1e-4, atol=1e-3)



def test_without_a_compiler_the_aten_path_runs_after_one_warning(monkeypatch):
    import hwsearch.cpu_kernels as ck

    def no_compiler():
        raise RuntimeError("Error building extension 'hwsearch_cpu_kernels'\ng++: command not found")

    monkeypatch.setattr(ck, "_build", no_compiler)
    monkeypatch.setattr(ck, "_state", {})
    x = torch.randn(3, 4, 5)
    a, b = torch.tensor(1.0), torch.tensor(3.0)
    rows = pact_scalars(a.reshape(1), b.reshape(1), torch.tensor([1.0]))
    with pytest.warns(RuntimeWarning, match="g\\+\\+: command not found"):
        y = FusedPact.apply(x, a, b, rows[0], True)
    torch.testing.assert_close(y, _PactQuant.apply(x, a, b, True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        FusedPact.apply(x, a, b, rows[0], True)


def test_one_cycle_sgd_steps_as_torch_sgd_under_one_cycle_lr():
    """``OneCycleSGD`` (the compiled step's optimizer) against ``torch.optim.SGD`` (Nesterov, weight
    decay) stepped with ``OneCycleLR``, float64, over a whole short schedule; a parameter without a
    gradient in a step is skipped as torch skips it."""
    from hwsearch.optim import OneCycleSGD

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=D) for s in [(3, 4), (5,), ()]]
    mine = [torch.nn.Parameter(v.clone()) for v in start]
    ref = [torch.nn.Parameter(v.clone()) for v in start]
    total = 12
    opt = OneCycleSGD(mine, lr=0.2, total=total, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.2, total_steps=total, pct_start=0.15,
                                                anneal_strategy="linear")
    index = torch.arange(total)
    for step in range(total):
        grads = [torch.randn(v.shape, generator=g, dtype=D) for v in start]
        for ps in (mine, ref):
            for k, p in enumerate(ps):
                p.grad = None if (k == 1 and step in (3, 4)) else grads[k].clone()
        opt.step(index[step])
        ref_opt.step()
        sched.step()
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert all(not torch.equal(a.detach(), v) for a, v in zip(mine, start))


def _digits_learning(compile: bool):
    from hwsearch.config import RunConfig
    from hwsearch.learn import calibrate, prepare, quantize_prepared

    cfg = RunConfig(model="resnet20", dataset="digits", budgets={"bitops": 40e6}, compile=compile,
                    max_train=256, max_test=64, batch_size=64, epochs=1, seed=0)
    prep = prepare(cfg)
    layers = quantize_prepared(prep, prep.w_init, prep.a_init, freeze=False)
    calibrate(prep.model, prep.data, 64)
    return prep, layers


def test_with_compile_the_whole_training_step_is_one_graph_and_learns_as_the_eager_one(monkeypatch):
    """``--compile``: forward, SINAREQ's loss terms, backward, both optimizer steps and the projection
    are one function handed to torch.compile with ``fullgraph=True`` (a graph break is then an
    error), and each compilation of it is one graph: one while the bits learn, one after the freeze.
    Compiled by Dynamo and AOTAutograd (the ``aot_eager`` backend: forward and backward traced,
    no machine code generated), a short SINAREQ phase ends where the eager step (torch's SGD and
    OneCycleLR) does: the same plan, the same weights up to float rounding."""
    from hwsearch.learn import learn_bits

    real_compile, aot_eager = torch.compile, torch._dynamo.lookup_backend("aot_eager")
    calls, graphs = [], []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": counting})

    monkeypatch.setattr(torch, "compile", compile)
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        prep, layers = _digits_learning(compile=compiled)
        bits = learn_bits(prep, layers, epochs=2)
        results.append((bits, [p.detach().clone() for p in prep.model.parameters()]))
    assert [c.get("fullgraph") for c in calls] == [True]  # one compiled function: the step
    assert len(graphs) == 2, [g.code for g in graphs]  # bits learning, bits frozen
    (bits_e, params_e), (bits_c, params_c) = results
    assert bits_e == bits_c
    weights = [(a, b) for a, b in zip(params_e, params_c) if a.dim() > 0]
    for a, b in weights:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The quantizers' scalars: Adam moves a parameter by about its learning rate whatever the size of
    # its gradient, so where a gradient is at the level of float rounding (a scale the DoReFa grid
    # does not use) the two runs' rounding decides the direction of each step. Most agree closely;
    # none can differ by more than the 8 steps' worth of moves.
    scalars = torch.stack([(a - b).abs() for a, b in zip(params_e, params_c) if a.dim() == 0])
    assert (scalars < 1e-4).float().mean() > 0.5 and scalars.max() < 8 * 2 * 0.02
