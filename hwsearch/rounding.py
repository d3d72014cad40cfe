"""Integer bits from continuous ones, with a hard guarantee: a plan never exceeds a budget.

After rounding, while any budget is exceeded, the move that saves the most cost (summed over
the violated budgets, each relative to its budget) per unit of expected accuracy loss is
taken: one bit off one layer's weights or activations. The expected loss of going from b to
b−1 bits is the growth of uniform quantization noise power, ∝ 4^−(b−1) − 4^−b, scaled by an
optional per-layer sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cost_models import CostModel, LayerTable

__all__ = ["BitSpace", "InfeasibleBudget", "budget_bits", "budget_shift", "check_feasible", "minimum_cost",
           "project_to_budgets"]


class InfeasibleBudget(ValueError):
    """A budget below the cost of every free layer at the minimum bits."""


@dataclass(frozen=True)
class BitSpace:
    """Which bits may move (``free_w``/``free_a`` per layer) and their range."""

    free_w: Sequence[bool]
    free_a: Sequence[bool]
    b_min: int = 2
    b_max: int = 8

    def fill(self, w_bits: Sequence[float], a_bits: Sequence[float], bits: float) -> tuple[list[float], list[float]]:
        """Every free bit at ``bits``, the fixed ones as given."""
        return ([bits if f else x for x, f in zip(w_bits, self.free_w)],
                [bits if f else x for x, f in zip(a_bits, self.free_a)])


def _clip(bits: Sequence[float], space: BitSpace) -> list[float]:
    return [min(max(float(b), 1.0), 32.0) for b in bits]


def minimum_cost(table: LayerTable, w_bits, a_bits, space: BitSpace, model: CostModel) -> float:
    """Cost with every free bit at ``b_min`` and fixed bits as given."""
    return model(table, *space.fill(w_bits, a_bits, space.b_min))


def check_feasible(table: LayerTable, w_bits, a_bits, space: BitSpace,
                   budgets: Sequence[tuple[CostModel, float]]) -> None:
    """Raise ``InfeasibleBudget`` naming the minimum attainable cost when a budget cannot be met."""
    for model, budget in budgets:
        lowest = minimum_cost(table, w_bits, a_bits, space, model)
        if lowest > budget:
            raise InfeasibleBudget(
                f"budget {model.name}={budget:.4g} is below the minimum attainable {lowest:.4g} {model.unit} "
                f"(every free layer at {space.b_min} bits, fixed layers as configured)")


def budget_bits(table: LayerTable, w_bits, a_bits, space: BitSpace,
                budgets: Sequence[tuple[CostModel, float]]) -> float:
    """The largest uniform continuous bitwidth b in [b_min, b_max] such that every free bit at b
    (fixed bits as given) meets every budget: the budget expressed as uniform bits.

    The SINAREQ run starts its learnable bits here, so that training begins at the budget's cost and
    the bits only have to be redistributed, not brought down from b_max. ``b_max`` when there is no
    budget; ``b_min`` when even that exceeds one (``check_feasible`` reports that case).
    """
    w, a = (torch.tensor(v, dtype=torch.float64) for v in space.fill(w_bits, a_bits, float(space.b_max)))
    t = budget_shift(table, w, a, torch.tensor(space.free_w), torch.tensor(space.free_a), budgets, space.b_min,
                     space.b_max, rounded=False, iters=40)  # to ~1e-11 bits
    return float(space.b_max) - float(t)


def budget_shift(table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor, free_w: torch.Tensor,
                 free_a: torch.Tensor, budgets: Sequence[tuple[CostModel, float]], b_min: float, b_max: float, *,
                 rounded: bool = True, iters: int = 16) -> torch.Tensor:
    """The smallest shift t >= 0 such that the free bits lowered by t (clipped to [b_min, b_max]),
    and rounded when ``rounded``, meet every budget; 0 when they already do.

    The learned bits are moved onto the budget this way after every optimizer step, so training
    always runs on a plan within budget and the final rounding has (almost) nothing left to take.
    No host synchronization (except a LUT model's own check) and no loop over layers:

    * rounded: the rounded cost changes only where a free bit, lowered by t, crosses a half-integer
      k + 1/2 (b_min <= k < b_max). Every such point (plus 1e-6, past the crossing) and 0 are the
      candidates, all priced at once as one batch of plans; the answer is the smallest that fits (exact).
    * not rounded: ``iters`` bisection steps on tensors (t to (b_max - b_min) / 2^iters bits).

    ``free_w``/``free_a`` are 0/1 masks aligned with the table; at t = b_max - b_min every free bit
    is at b_min, which ``check_feasible`` has made sure fits.
    """
    w, a = w_bits.detach().double(), a_bits.detach().double()
    mw, ma = free_w.to(device=w.device, dtype=torch.bool), free_a.to(device=w.device, dtype=torch.bool)

    def fits(t: torch.Tensor) -> torch.Tensor:  # t of any shape; the plans it gives priced in one batch
        t = t[..., None]
        ws, as_ = (w - t).clamp(b_min, b_max), (a - t).clamp(b_min, b_max)
        if rounded:
            ws, as_ = torch.round(ws), torch.round(as_)
        ws, as_ = torch.where(mw, ws, w), torch.where(ma, as_, a)
        ok = torch.ones(t.shape[:-1], dtype=torch.bool, device=w.device)
        for model, budget in budgets:
            ok = ok & (model.layer_costs(table, ws, as_).sum(-1) <= budget * (1 + 1e-12))
        return ok

    zero = w.new_zeros(())
    if rounded:
        halves = torch.arange(int(b_min), int(b_max), device=w.device, dtype=w.dtype) + 0.5
        crossing = torch.cat([w, a])[:, None] - halves + 1e-6  # the shift that takes bit i just below k + 1/2
        crossing = torch.where(torch.cat([mw, ma])[:, None] & (crossing > 0), crossing, zero)
        candidates = torch.cat([crossing.flatten(), (zero + float(b_max - b_min))[None]])
        inf = torch.full_like(candidates, float("inf"))
        return torch.where(fits(candidates), candidates, inf).min()
    lo, hi = zero, zero + float(b_max - b_min)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = fits(mid)
        lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    return torch.where(fits(zero), zero, hi)


def project_to_budgets(table: LayerTable, w_bits: Sequence[float], a_bits: Sequence[float], space: BitSpace,
                       budgets: Sequence[tuple[CostModel, float]], *,
                       sensitivity: Sequence[float] | None = None) -> tuple[list[int], list[int]]:
    """Round continuous bits to integers in [b_min, b_max] (free bits only), lower bits greedily
    until every budget holds, then raise bits that rounding lowered while every budget still holds.

    Raises:
        InfeasibleBudget: when even the all-minimum assignment exceeds a budget.
    """
    w = [int(min(max(round(float(b)), space.b_min), space.b_max)) if f else int(round(float(b)))
         for b, f in zip(w_bits, space.free_w)]
    a = [int(min(max(round(float(b)), space.b_min), space.b_max)) if f else int(round(float(b)))
         for b, f in zip(a_bits, space.free_a)]
    check_feasible(table, w, a, space, budgets)
    sens = list(sensitivity) if sensitivity is not None else [1.0] * len(table)
    singles = [LayerTable((layer,), table.input_shape) for layer in table.layers]
    cache: dict[tuple[int, int, int, int], float] = {}

    def layer_cost(k: int, i: int, wb: int, ab: int) -> float:
        key = (k, i, wb, ab)
        if key not in cache:
            cache[key] = budgets[k][0](singles[i], [wb], [ab])
        return cache[key]

    def total(k: int) -> float:
        return sum(layer_cost(k, i, w[i], a[i]) for i in range(len(table)))

    def fits(k: int, i: int, wb: int, ab: int, wi: int, ai: int) -> bool:
        new = total(k) - layer_cost(k, i, wi, ai) + layer_cost(k, i, wb, ab)
        return new <= caps[k]

    while True:
        violated = [k for k, (_, budget) in enumerate(budgets) if total(k) > budget * (1 + 1e-12)]
        if not violated:
            break
        best, best_score = None, None
        for i in range(len(table)):
            for kind, bits, free in (("w", w, space.free_w), ("a", a, space.free_a)):
                if not free[i] or bits[i] <= space.b_min:
                    continue
                if kind == "w" and not table.layers[i].has_weight:
                    continue
                new_w, new_a = (w[i] - 1, a[i]) if kind == "w" else (w[i], a[i] - 1)
                saving = sum((layer_cost(k, i, w[i], a[i]) - layer_cost(k, i, new_w, new_a)) / budgets[k][1]
                             for k in violated)
                noise = 4.0 ** -(bits[i] - 1) - 4.0 ** -bits[i]
                score = saving / (max(sens[i], 1e-12) * noise)
                if best_score is None or score > best_score:
                    best, best_score = (kind, i), score
        if best is None:  # cannot happen after check_feasible; kept as a clear failure
            raise InfeasibleBudget("no bits left to lower and a budget is still exceeded")
        kind, i = best
        (w if kind == "w" else a)[i] -= 1
    if budgets:
        # Give back what rounding took: raise bits that were rounded down (never above the learned
        # ceiling or b_max) while every cost stays within both its budget and the cost of the
        # continuous bits, so a plan lands where training left it rather than at the cap.
        caps = [min(b, m(table, _clip(w_bits, space), _clip(a_bits, space))) for m, b in budgets]
        ceil_w = [min(math.ceil(float(b) - 1e-9), space.b_max) for b in w_bits]
        ceil_a = [min(math.ceil(float(b) - 1e-9), space.b_max) for b in a_bits]
        while True:
            best, best_score = None, None
            for i in range(len(table)):
                for kind, bits, free, ceil in (("w", w, space.free_w, ceil_w), ("a", a, space.free_a, ceil_a)):
                    if not free[i] or bits[i] >= ceil[i] or (kind == "w" and not table.layers[i].has_weight):
                        continue
                    new_w, new_a = (w[i] + 1, a[i]) if kind == "w" else (w[i], a[i] + 1)
                    if not all(fits(k, i, new_w, new_a, w[i], a[i]) for k in range(len(budgets))):
                        continue
                    extra = sum((layer_cost(k, i, new_w, new_a) - layer_cost(k, i, w[i], a[i])) / budgets[k][1]
                                for k in range(len(budgets)))
                    gain = 4.0 ** -bits[i] - 4.0 ** -(bits[i] + 1)
                    score = max(sens[i], 1e-12) * gain / max(extra, 1e-15)
                    if best_score is None or score > best_score:
                        best, best_score = (kind, i), score
            if best is None:
                break
            kind, i = best
            (w if kind == "w" else a)[i] += 1
    return w, a
