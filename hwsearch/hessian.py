"""The Hessian allocator: per-layer sensitivity from Hessian traces, bits from an exact integer program.

HAWQ-V2 (Dong et al. 2020) measures how much a layer's quantization hurts by the average Hessian
trace of the loss over that layer's tensor times the squared quantization error it suffers:
Ω_l(b) = Tr(H_l)/n_l · ||Q_b(x_l) − x_l||², the second-order loss increase of an isotropic
perturbation of that size. HAWQ-V3 (Yao et al. 2021) then chooses every layer's bits with an
integer linear program: minimize Σ_l Ω_l subject to the hardware budget. Here both the weights
(Tr of the Hessian in the layer's weights) and the layer's input activation (Tr of the Hessian
in that input tensor) get a term, so a layer's option is a (weight bits, activation bits) pair,
and every budget of the run is a constraint. The traces are estimated with Hutchinson's method,
Tr(H) = E[vᵀHv] over Rademacher v, one Hessian-vector product giving every layer's estimate at
once. The program is a multiple-choice knapsack solved exactly by HiGHS (``scipy.optimize.milp``,
zero gap); a plan is checked against its budgets afterwards, so solver tolerances never let a
plan exceed one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cost_models import CostModel, LayerTable

from .quant import WeightQuantizer, _PactQuant, mse_clip, weight_quantizers
from .rounding import BitSpace, InfeasibleBudget, project_to_budgets

__all__ = ["Sensitivity", "hessian_bits", "hutchinson_traces", "measured_sensitivity", "measured_sensitivity_trained",
           "plan_bits", "sensitivity", "solve_bits"]


def hutchinson_traces(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                      samples: int = 16, seed: int = 0,
                      loss_fn=None) -> tuple[dict[str, float], dict[str, float]]:
    """Hutchinson estimates of the Hessian trace of the loss (``loss_fn(output, target)``, default
    cross-entropy) in each named module's
    weight and in its input tensor, averaged over ``batches`` and ``samples`` Rademacher vectors.

    The model runs in eval mode (batch norm as an affine map, as HAWQ does). A module's input gets
    a zero tensor added by a forward pre-hook; the loss's derivatives in that zero are its
    derivatives in the input.

    Returns:
        (weight traces, input traces), by module name.
    """
    modules = dict(model.named_modules())
    targets = [modules[n] for n in names]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tw = dict.fromkeys(names, 0.0)
    ta = dict.fromkeys(names, 0.0)
    was = model.training
    model.eval()
    zeros: dict[str, torch.Tensor] = {}

    def hook(mod, args, name):
        z = torch.zeros_like(args[0], requires_grad=True)
        zeros[name] = z
        return (args[0] + z, *args[1:])

    try:
        for x, y in batches:
            zeros.clear()
            handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n))
                       for n, m in zip(names, targets)]
            try:
                loss = (loss_fn or F.cross_entropy)(model(x), y)
            finally:
                for h in handles:
                    h.remove()
            params = [m.weight for m in targets] + [zeros[n] for n in names]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(samples):
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2.0 - 1.0).to(p) for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for i, n in enumerate(names):
                    tw[n] += float((vs[i] * hv[i]).sum()) / (samples * len(batches))
                    j = len(names) + i
                    ta[n] += float((vs[j] * hv[j]).sum()) / (samples * len(batches))
    finally:
        model.train(was)
    return tw, ta


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer expected loss increase Ω at each bitwidth, for weights and for the input activation."""

    names: tuple[str, ...]
    bits: tuple[int, ...]
    weight: dict[str, dict[int, float]]
    act: dict[str, dict[int, float]]
    weight_trace: dict[str, float]
    act_trace: dict[str, float]


@torch.no_grad()
def _layer_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensor of each named module on batch ``x`` (one forward pass in eval mode)."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
               for n in names]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return inputs


@torch.no_grad()
def _errors(model: nn.Module, names: Sequence[str], x: torch.Tensor, quantizer: WeightQuantizer,
            bits: Sequence[int]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], dict[str, int]]:
    """Squared quantization error of each module's weight (``quantizer`` at its starting scale) and of its
    input on batch ``x`` (PACT at the least-squared-error clip for that bitwidth), at each of ``bits``;
    and the number of elements of each input."""
    modules = dict(model.named_modules())
    inputs = _layer_inputs(model, names, x)
    ew: dict[str, dict[int, float]] = {}
    ea: dict[str, dict[int, float]] = {}
    for n in names:
        w = modules[n].weight.detach()
        scale = torch.tensor(quantizer.init_scale(w), device=w.device)
        xin = inputs[n]
        signed = bool((xin < 0).any())
        ew[n], ea[n] = {}, {}
        for b in bits:
            beta = torch.tensor(float(b), device=w.device)
            w_hat, _ = quantizer.quantize(w, beta, scale)
            ew[n][b] = float((w_hat - w).square().sum())
            if b < quantizer.min_bits:
                ew[n][b] = float("inf")
            alpha = mse_clip(xin, beta, signed)
            ea[n][b] = float((_PactQuant.apply(xin, alpha, beta, signed) - xin).square().sum())
    return ew, ea, {n: inputs[n].numel() for n in names}


def sensitivity(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                quantizer: str | WeightQuantizer, bits: Sequence[int], samples: int = 16,
                seed: int = 0, loss_fn=None) -> Sensitivity:
    """Ω of every named layer at every bitwidth in ``bits`` (HAWQ-V2's Tr(H)/n · ||ΔQ||²), for its
    weights and its input activation, on a float model."""
    q = weight_quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    tw, ta = hutchinson_traces(model, names, batches, samples=samples, seed=seed, loss_fn=loss_fn)
    modules = dict(model.named_modules())
    x0 = batches[0][0]
    ew, ea, numel_in = _errors(model, names, x0, q, bits)
    # Tr(H) is estimated on several batches but errors on the first: both are per-element averages
    # (the trace over the tensor's elements), so Ω = mean curvature × total squared error.
    weight = {n: {b: max(tw[n], 0.0) / modules[n].weight.numel() * ew[n][b] for b in bits} for n in names}
    act = {n: {b: max(ta[n], 0.0) / numel_in[n] * ea[n][b] for b in bits} for n in names}
    return Sensitivity(tuple(names), tuple(bits), weight, act, tw, ta)


def solve_bits(options: Sequence[Sequence[tuple[int, int]]], objective: Sequence[Sequence[float]],
               costs: Sequence[Sequence[Sequence[float]]], budgets: Sequence[float]) -> list[int]:
    """The exact optimum of a multiple-choice knapsack: pick one option per layer to minimize the summed
    objective subject to Σ cost_k ≤ budget_k for every k.

    Args:
        options: per layer, its (weight bits, activation bits) choices.
        objective: per layer, one value per option.
        costs: per budget k, per layer, one cost per option.
        budgets: the caps.

    Returns:
        The index of the chosen option for each layer.

    Raises:
        InfeasibleBudget: no choice meets every budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(o) for o in options]
    offsets = np.cumsum([0, *sizes])
    n = int(offsets[-1])
    c = np.concatenate([np.asarray(v, dtype=float) for v in objective])
    finite = np.isfinite(c)
    scale = max(float(np.abs(c[finite]).max()) if finite.any() else 1.0, 1e-300)
    c = np.where(finite, c / scale, 0.0)
    upper = finite.astype(float)  # an option with infinite loss is forbidden
    one_each = np.zeros((len(options), n))
    for i in range(len(options)):
        one_each[i, offsets[i]:offsets[i + 1]] = 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    for cost, budget in zip(costs, budgets):
        row = np.concatenate([np.asarray(v, dtype=float) for v in cost]) / budget  # relative to the cap: well scaled
        constraints.append(LinearConstraint(row[None, :], -np.inf, 1.0))
    # HiGHS accepts a constraint violated within its feasibility tolerance (about 1e-6 of a budget); a
    # choice that exceeds a budget by a hair in exact arithmetic is cut off (no-good cut: not this same
    # choice again) and the program solved again, so the answer is exact.
    for _ in range(100):
        res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(np.zeros(n), upper),
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.status != 0 or res.x is None:
            raise InfeasibleBudget(f"the integer program has no solution within the budgets ({res.message})")
        choice = [int(np.argmax(res.x[offsets[i]:offsets[i + 1]])) for i in range(len(options))]
        if all(sum(cost[i][j] for i, j in enumerate(choice)) <= budget for cost, budget in zip(costs, budgets)):
            return choice
        cut = np.zeros(n)
        cut[[offsets[i] + j for i, j in enumerate(choice)]] = 1.0
        constraints.append(LinearConstraint(cut[None, :], -np.inf, len(options) - 1))
    raise InfeasibleBudget("the integer program kept returning choices just over a budget")


def _mean_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn=None) -> float:
    """Mean loss of ``model`` (as it is set now) over every sample of ``batches``: cross-entropy, or the
    user's ``loss_fn`` (a batch mean) weighted by each batch's size."""
    if loss_fn is None:
        total = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches)
    else:
        total = sum(loss_fn(model(x), y) * len(x) for x, y in batches)
    return float(total) / sum(len(x) for x, _ in batches)


@torch.no_grad()
def measured_sensitivity(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         *, quantizer: str | WeightQuantizer, bits: Sequence[int], loss_fn=None) -> Sensitivity:
    """Ω of every named layer at every bitwidth in ``bits``, measured instead of modelled: the increase
    of the mean cross-entropy over ``batches`` when that layer alone has its weights (or, separately,
    its input) quantized at that bitwidth, every other layer in float (eval mode).

    This is what a second-order model approximates (HAWQ's Tr(H)/n · ||ΔQ||²), without its two weak
    points here: the input traces are tiny and noisy, and a 2-bit activation's error is no small
    perturbation. Values are clipped at 0 and made non-increasing in the bitwidth (noise at high bits
    must not make a bit look harmful). Weights use the quantizer at its starting scale, inputs PACT at
    the least-squared-error clip of the first batch. Cost: 2 · len(names) · len(bits) forward passes
    over ``batches``.
    """
    q = weight_quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    modules = dict(model.named_modules())
    was = model.training
    model.eval()

    def loss() -> float:
        return _mean_loss(model, batches, loss_fn)

    first = _layer_inputs(model, names, batches[0][0])
    weight: dict[str, dict[int, float]] = {}
    act: dict[str, dict[int, float]] = {}
    try:
        base = loss()
        for n in names:
            mod = modules[n]
            w = mod.weight.detach().clone()
            scale = torch.tensor(q.init_scale(w), device=w.device)
            signed = bool((first[n] < 0).any())
            weight[n], act[n] = {}, {}
            for b in bits:
                beta = torch.tensor(float(b), device=w.device)
                if b < q.min_bits:
                    weight[n][b] = float("inf")
                else:
                    mod.weight.copy_(q.quantize(w, beta, scale)[0])
                    try:
                        weight[n][b] = loss() - base
                    finally:
                        mod.weight.copy_(w)
                alpha = mse_clip(first[n], beta, signed)
                h = mod.register_forward_pre_hook(
                    lambda m, args, a=alpha, bt=beta, sg=signed: (_PactQuant.apply(args[0], a, bt, sg), *args[1:]))
                try:
                    act[n][b] = loss() - base
                finally:
                    h.remove()
    finally:
        model.train(was)
    for table in (weight, act):
        for n in names:
            worst = 0.0
            for b in sorted(bits, reverse=True):  # from the most bits down: Ω(b) >= Ω(b + 1) >= 0
                worst = max(worst, table[n][b])
                table[n][b] = worst
    nan = dict.fromkeys(names, float("nan"))
    return Sensitivity(tuple(names), tuple(bits), weight, act, nan, dict(nan))


@torch.no_grad()
def measured_sensitivity_trained(model: nn.Module, layers: dict, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                                 *, bits: Sequence[int], loss_fn=None) -> Sensitivity:
    """Ω of every quantized layer at every bitwidth in ``bits``, measured on a model already trained
    quantized (at uniform bits b0): the change of the mean cross-entropy over ``batches`` when that
    layer alone has its weight bitwidth (or, separately, its input's) set to b, every other layer at
    its trained bits (eval mode, each layer's learned scale and clip kept).

    Unlike ``measured_sensitivity`` (one layer quantized in an otherwise float model), this prices a
    bit where the plan will live: in a network that has adapted to low bits everywhere. Ω(b0) is 0
    (b0: the layer's trained bits), fewer bits cost (Ω ≥ 0, running maximum from b0 down), more bits
    gain or nothing (Ω ≤ 0, running minimum from b0 up). Without re-training, more bits can read as
    harm: weights trained on one grid, moved to a finer one that does not contain it (DoReFa's
    2^b − 1 levels are not nested), shift the layer's output; that reads as no gain, as a bit more
    never costs accuracy once trained. A layer whose input is not quantized (the image) gets 0 for
    its input. Cost: 2 · len(layers) · len(bits) forward passes over ``batches``.
    """
    was = model.training
    model.eval()

    def loss() -> float:
        return _mean_loss(model, batches, loss_fn)

    weight: dict[str, dict[int, float]] = {}
    act: dict[str, dict[int, float]] = {}
    try:
        base = loss()
        for n, m in layers.items():
            weight[n], act[n] = {}, {}
            for table, beta, measure in ((weight[n], m.w_beta, True), (act[n], m.a_beta, m.quantize_input)):
                trained = beta.detach().clone()
                for b in bits:
                    if not measure:
                        table[b] = 0.0
                    elif b < m.quantizer.min_bits and beta is m.w_beta:
                        table[b] = float("inf")
                    else:
                        beta.fill_(float(b))
                        try:
                            table[b] = loss() - base
                        finally:
                            beta.copy_(trained)
                b0 = float(trained)
                # Below b0, from b0 down: a cost, Ω(b) >= Ω(b + 1) >= 0; above it, from b0 up: a gain,
                # 0 >= Ω(b) >= Ω(b + 1); Ω(b0) = 0.
                worst = best = 0.0
                for b in sorted(bits, reverse=True):
                    if b < b0:
                        worst = table[b] = max(worst, table[b])
                for b in sorted(bits):
                    if b > b0:
                        best = table[b] = min(best, table[b])
                    elif b == b0:
                        table[b] = 0.0
    finally:
        model.train(was)
    nan = dict.fromkeys(layers, float("nan"))
    return Sensitivity(tuple(layers), tuple(bits), weight, act, nan, dict(nan))


def plan_bits(table: LayerTable, space: BitSpace, w_fixed: Sequence[float], a_fixed: Sequence[float],
              budgets: Sequence[tuple[CostModel, float]], sens: Sensitivity, *,
              tie: bool = False) -> tuple[list[int], list[int]]:
    """Integer bits per table row that minimize Σ Ω (``sens``) within every budget (free bits in
    [b_min, b_max]; fixed bits as given in ``w_fixed``/``a_fixed``): the exact integer program.
    ``tie``: a layer whose weight and input bits are both free gets one bitwidth for both (HAWQ-V3)."""
    bits = tuple(range(space.b_min, space.b_max + 1))
    n = len(table)
    opts: list[list[tuple[int, int]]] = []
    objective: list[list[float]] = []
    for i, layer in enumerate(table.layers):
        ws = bits if space.free_w[i] else (int(round(w_fixed[i])),)
        as_ = bits if space.free_a[i] else (int(round(a_fixed[i])),)
        pairs = [(b, b) for b in bits] if tie and space.free_w[i] and space.free_a[i] else list(itertools.product(ws, as_))
        opts.append(pairs)
        quantized = layer.name in sens.weight
        objective.append([(sens.weight[layer.name].get(wb, 0.0) if quantized and space.free_w[i] else 0.0)
                          + (sens.act[layer.name].get(ab, 0.0) if quantized and space.free_a[i] else 0.0)
                          for wb, ab in pairs])
    # Each cost model is a sum over layers: price every (w, a) pair once for all layers.
    cache: dict[tuple[int, int, int], list[float]] = {}

    def layer_cost(k: int, i: int, wb: int, ab: int) -> float:
        if (k, wb, ab) not in cache:
            cache[(k, wb, ab)] = budgets[k][0].per_layer(table, [wb] * n, [ab] * n)
        return cache[(k, wb, ab)][i]

    costs = [[[layer_cost(k, i, wb, ab) for wb, ab in opts[i]] for i in range(n)] for k in range(len(budgets))]
    choice = solve_bits(opts, objective, costs, [b for _, b in budgets])
    w = [opts[i][j][0] for i, j in enumerate(choice)]
    a = [opts[i][j][1] for i, j in enumerate(choice)]
    # The solver works to a tolerance; the hard guarantee is checked in exact arithmetic (and restored
    # by the greedy rounding if a tolerance ever let a plan exceed a budget).
    if any(m(table, w, a) > b * (1 + 1e-12) for m, b in budgets):
        w, a = project_to_budgets(table, w, a, space, budgets)
    return w, a


def hessian_bits(model: nn.Module, table: LayerTable, names: Sequence[str], space: BitSpace,
                 w_fixed: Sequence[float], a_fixed: Sequence[float], budgets: Sequence[tuple[CostModel, float]],
                 batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, quantizer: str, samples: int = 16,
                 seed: int = 0, measured: bool = False, tie: bool = False,
                 loss_fn=None) -> tuple[tuple[list[int], list[int]], Sensitivity]:
    """Integer bits per table row that minimize Σ Ω within every budget, Ω from Hessian traces
    (``sensitivity``) or, with ``measured``, from the loss itself (``measured_sensitivity``); ``tie``:
    one bitwidth per layer for its weights and its input.

    Returns:
        ((weight bits, activation bits) per table row, the sensitivity it was chosen from).
    """
    bits = tuple(range(space.b_min, space.b_max + 1))
    if measured:
        sens = measured_sensitivity(model, names, batches, quantizer=quantizer, bits=bits, loss_fn=loss_fn)
    else:
        sens = sensitivity(model, names, batches, quantizer=quantizer, bits=bits, samples=samples, seed=seed,
                           loss_fn=loss_fn)
    return plan_bits(table, space, w_fixed, a_fixed, budgets, sens, tie=tie), sens
