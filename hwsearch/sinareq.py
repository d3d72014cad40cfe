"""SINAREQ: the sinusoidal regularizer, its schedule, and the hardware terms of the loss.

Paper: Elthakeb et al., "WaveQ: Gradient-Based Deep Quantization of Neural Networks through
Sinusoidal Adaptive Regularization" (SinReQ/WaveQ). The regularizer is placed on the grid
of the quantizer in use (DESIGN.md): R = mean_i sin^2(pi u_i / Δ(β)) / 2^β.
"""

from __future__ import annotations

import math

import torch

from cost_models import CostModel, LayerTable

from .quant import WeightQuantizer

__all__ = ["accuracy_cost", "bit_pressure", "budget_penalty", "regularizer", "strength"]


def regularizer(w: torch.Tensor, beta: torch.Tensor, scale: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """SINAREQ penalty of weights ``w`` at continuous bitwidth ``beta``.

    Zero exactly when every weight sits on a level of ``quantizer`` at ``beta``; its gradient
    in ``w`` points to the nearest level, and its gradients in ``beta`` and ``scale`` move the
    period. The normalization 1/2^β weighs the penalty of each layer but is detached from β's
    gradient: left in, its -ln2·R term always favours more weight bits and, at the strengths that
    pull weights onto levels, outweighs the budget term, so activations alone pay for the budget.
    (``QuantConv2d``/``QuantLinear`` call the same ``WeightQuantizer.penalty`` inside their forward
    pass from the ``u`` they already have.)
    """
    return quantizer.penalty(quantizer.normalize(w, scale), beta)


def strength(step: int | torch.Tensor, total: int, *, start: float = 0.2, width: float = 0.05) -> float | torch.Tensor:
    """Smooth switch-on ½(1 + tanh((t - t0)/τ)) with t0 = start·total, τ = width·total (WaveQ's schedule).
    A float for a Python step; a 0-d tensor for a tensor step (a compiled training step's)."""
    t0, tau = start * total, max(width * total, 1e-9)
    if isinstance(step, torch.Tensor):
        return 0.5 * (1.0 + torch.tanh((step.double() - t0) / tau)).float()
    return 0.5 * (1.0 + math.tanh((float(step) - t0) / tau))


def budget_penalty(table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor,
                   budgets: list[tuple[CostModel, float]]) -> torch.Tensor:
    """Σ_k relu(cost_k(β)/budget_k − 1): zero inside every budget, linear above it."""
    total = w_bits.new_zeros(())
    for model, budget in budgets:
        total = total + torch.relu(model.torch(table, w_bits, a_bits) / budget - 1.0)
    return total


def bit_pressure(table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor, model: CostModel,
                 learn_w: torch.Tensor, learn_a: torch.Tensor) -> torch.Tensor:
    """Σ_l share_l · (β_w,l + β_a,l) / 8 over learned bits, share_l = layer l's fraction of the cost
    (detached): layers that dominate the cost feel the most pressure to shed bits."""
    costs = model.layer_costs(table, w_bits, a_bits).detach()
    share = costs / costs.sum().clamp_min(1e-12)
    return (share * (w_bits * learn_w + a_bits * learn_a)).sum() / 8.0


def accuracy_cost(bits: torch.Tensor, omega: torch.Tensor, b_min: int) -> torch.Tensor:
    """Σ_l Ω_l(β_l): each layer's measured loss increase (``omega[l, k]`` at bitwidth b_min + k, e.g.
    from ``hwsearch.hessian.measured_sensitivity``), linear between integer bitwidths, so that β_l's
    gradient is minus what the layer's next bit is worth in loss. Rows of zeros leave a layer out."""
    top = omega.shape[1] - 1
    x = bits - b_min  # not clamped: at b_min exactly (where the projection leaves many bits) β keeps its slope
    k = x.detach().floor().clamp(0, top - 1).long()
    lo = omega.gather(1, k[:, None])[:, 0]
    hi = omega.gather(1, (k + 1)[:, None])[:, 0]
    return (lo + (x - k) * (hi - lo)).sum()
