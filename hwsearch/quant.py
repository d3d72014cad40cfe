"""Fake quantization that keeps the user's module names.

Conv and Linear modules are swapped in place for subclasses (``QuantConv2d``,
``QuantLinear``) that carry, per layer, a learnable continuous weight bitwidth
``w_beta``, a weight scale ``w_scale``, an activation bitwidth ``a_beta`` and a PACT clip
``a_alpha``. ``model.named_modules()`` is unchanged, so plans and cost tables stay keyed
by the names a user sees.

The forward pass quantizes on the grid of the *rounded* bitwidth round(β), the same grid the
SINAREQ regularizer uses, so the network always trains on a grid it can be deployed at. Two
straight-through estimators carry gradients: one for rounding values, written so that the step
size (hence the bitwidth and the scale) gets a gradient (as in LSQ, Esser et al. 2020):
``q = Δ * (x/Δ + stopgrad(round(x/Δ) - x/Δ))``, and one for rounding β, so that β moves
continuously while the grid changes only when β crosses a half-integer, so the freeze never moves
a layer onto a new grid (docs/design.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from cost_models import Registry

from .fused import FusedPact, FusedWeights, pact_scalars, stack_scalars

__all__ = ["DoReFa", "QuantConv2d", "QuantLinear", "WRPN", "WeightQuantizer", "mse_clip", "quant_layers", "quantize_model",
           "take_penalties", "weight_quantizers"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


class WeightQuantizer(ABC):
    """Maps weights to a unit grid ``u`` whose levels are multiples of ``step(beta)``."""

    name: str = ""
    min_bits: float = 1.0
    fused: str | None = None  # the kind hwsearch.fused.FusedWeights computes for all layers at once

    @abstractmethod
    def normalize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Weights in grid units ``u``; levels sit at integer multiples of ``step(beta)``."""

    @abstractmethod
    def step(self, beta: torch.Tensor) -> torch.Tensor:
        """Grid step Δ(β) at continuous bitwidth β."""

    @abstractmethod
    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Quantized grid values back to weight space."""

    def quantize(self, w: torch.Tensor, beta: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (quantized weights, u) so that the regularizer can reuse ``u``."""
        u = self.normalize(w, scale)
        delta = self.step(round_ste(beta))
        q = delta * round_ste(u / delta)
        # No clamp of q: u lies in the grid's range, so round(u/Δ) is a level. A clamp would change
        # nothing in value, but torch.clamp passes no gradient at its bounds: the weights on the
        # extreme levels (at 2 bits, every WRPN weight with |u| > 1/2) would stop learning.
        return self.dequantize(q, scale), u

    def penalty(self, u: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """SINAREQ (WaveQ's normalized form) on this quantizer's grid: mean sin^2(pi u / Δ(b)) / 2^b
        at b = round(β), β's gradient passed straight through the rounding (the grid the forward
        pass quantizes on).

        Zero exactly on the levels. 1/2^b is detached from β's gradient; see
        ``hwsearch.sinareq.regularizer`` for why.
        """
        bits = round_ste(beta)
        return torch.sin(math.pi * u / self.step(bits)).pow(2).mean() / torch.pow(2.0, bits.detach())

    def levels(self, bits: int, scale: float) -> torch.Tensor:
        """The quantization levels in weight space at integer ``bits`` (for plots)."""
        delta = float(self.step(torch.tensor(float(bits))))
        k = torch.arange(-round(1 / delta), round(1 / delta) + 1, dtype=torch.float64)
        q = (k * delta)
        q = q[(q >= self._qmin - 1e-9) & (q <= 1 + 1e-9)]
        return self.dequantize(q, torch.tensor(scale, dtype=torch.float64))

    def init_scale(self, w: torch.Tensor) -> float:
        return float(w.detach().abs().max().clamp_min(1e-8))

    @abstractmethod
    def code_step(self, bits: int, scale: torch.Tensor) -> torch.Tensor:
        """The weight-space distance between neighbouring levels at integer ``bits``: every quantized
        weight is an integer multiple of it (``codes``)."""

    @torch.no_grad()
    def codes(self, w: torch.Tensor, bits: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes c and the step such that the quantized weights are exactly ``step * c``: the
        layer's weights as a deployment stores them (at most 2^bits distinct codes)."""
        w_hat, _ = self.quantize(w, torch.tensor(float(bits), device=w.device), scale)
        step = self.code_step(bits, scale)
        return torch.round(w_hat / step).to(torch.int32), step


class DoReFa(WeightQuantizer):
    """DoReFa (Zhou et al. 2016): u = tanh(w)/(2 max|tanh w|) + 1/2 in [0, 1], Δ = 1/(2^β - 1),
    ŵ = s (2q - 1). The scale s (initialized to max|w|) keeps the float model's weight magnitude,
    which matters for layers not followed by batch norm."""

    name = "dorefa"
    fused = "dorefa"
    min_bits = 1.0
    _qmin = 0.0

    def normalize(self, w, scale):
        t = torch.tanh(w)
        return t / (2 * t.detach().abs().max().clamp_min(1e-8)) + 0.5

    def step(self, beta):
        return 1.0 / (torch.pow(2.0, beta) - 1)

    def dequantize(self, q, scale):
        return scale * (2 * q - 1)

    def code_step(self, bits, scale):
        # ŵ = s(2k/(2^b - 1) - 1) = s/(2^b - 1) · (2k - (2^b - 1)): odd codes in ±(2^b - 1).
        return scale / (2.0**bits - 1)


class WRPN(WeightQuantizer):
    """WRPN (Mishra et al. 2018): u = clip(w/s, -1, 1), symmetric levels k/(2^(β-1) - 1), ŵ = s q."""

    name = "wrpn"
    fused = "wrpn"
    min_bits = 2.0
    _qmin = -1.0

    def normalize(self, w, scale):
        return torch.clamp(w / scale, -1.0, 1.0)

    def step(self, beta):
        return 1.0 / (torch.pow(2.0, beta - 1) - 1)

    def dequantize(self, q, scale):
        return scale * q

    def code_step(self, bits, scale):
        # ŵ = s · k/(2^(b-1) - 1), k in ±(2^(b-1) - 1).
        return scale / (2.0 ** (bits - 1) - 1)

    def init_scale(self, w):
        # max|w| leaves almost every weight at 0 at 2-3 bits; 3 std keeps the bulk on the grid.
        w = w.detach()
        return float(torch.minimum(w.abs().max(), 3 * w.std()).clamp_min(1e-8))


weight_quantizers: Registry[WeightQuantizer] = Registry("weight quantizer")
weight_quantizers.register("dorefa", DoReFa())
weight_quantizers.register("wrpn", WRPN())


class _PactQuant(torch.autograd.Function):
    """PACT (Choi et al. 2018) at bits round(β), in one pass forward and one backward.

    y = clip(x, lo, α), lo = -α (signed inputs) or 0; Δ = (α - lo)/(2^round(β) - 1);
    ŷ = lo + Δ round((y - lo)/Δ). Gradients: x gets the straight-through gradient inside the
    clip range [lo, α] (bounds included); α gets the PACT gradient plus the step-size term; β the
    step-size term. The reference formulas: the training step uses ``hwsearch.fused.FusedPact``.
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, signed: bool):
        lo = -alpha if signed else torch.zeros_like(alpha)
        levels = torch.pow(2.0, torch.round(beta)) - 1  # integer bits forward; β's gradient straight through
        delta = (alpha - lo) / levels
        y = torch.maximum(torch.minimum(x, alpha), lo)
        t = (y - lo) / delta
        r = torch.round(t)
        ctx.save_for_backward(x, alpha, beta, (r - t).to(torch.float16 if x.is_cuda else x.dtype))
        ctx.signed = signed
        return lo + delta * r

    @staticmethod
    def backward(ctx, g):
        x, alpha, beta, err = ctx.saved_tensors
        signed = ctx.signed
        lo = -alpha if signed else torch.zeros_like(alpha)
        above = x > alpha
        below = x < lo
        inside = ~(above | below)
        gx = g * inside
        bits = torch.round(beta)
        levels = torch.pow(2.0, bits) - 1
        span = alpha - lo
        # d(lo + Δ r)/dΔ = r = t + err; with the STE in t, only err survives: dŷ/dΔ|ste = err.
        g_err = (g * err.to(g.dtype)).sum()
        # α: the clipped region passes ∂/∂α of the clip (1 above, -1 below when signed), plus dΔ/dα.
        d_span = 2.0 if signed else 1.0
        g_alpha = (g * above).sum() - ((g * below).sum() if signed else 0) + g_err * d_span / levels
        # β: dΔ/dβ = -span * ln2 * 2^β / levels^2.
        g_beta = g_err * (-span * math.log(2.0) * torch.pow(2.0, bits) / levels ** 2)
        return gx, g_alpha.reshape(alpha.shape), g_beta.reshape(beta.shape), None


@torch.no_grad()
def mse_clip(x: torch.Tensor, bits: torch.Tensor | float, signed: bool, *, candidates: int = 100,
             sample: int = 100_000) -> torch.Tensor:
    """The PACT clip α in {max|x|·k/candidates} whose quantization of ``x`` at ``bits`` has the least
    mean squared error (on an evenly strided sample of at most ``sample`` values).

    A high quantile of |x| is a fine clip at 8 bits and a poor one at 2-3: with α at the 0.999
    quantile and 3 levels, most activations of a deep layer round to zero, and QAT from there
    either never recovers or diverges.
    """
    flat = x.detach().flatten().float()
    flat = flat[:: max(1, -(-flat.numel() // sample))]
    top = flat.abs().max().clamp_min(1e-3)
    alpha = top * torch.arange(1, candidates + 1, device=flat.device, dtype=flat.dtype)[:, None] / candidates
    beta = torch.as_tensor(bits, device=flat.device, dtype=flat.dtype)
    err = (_PactQuant.apply(flat[None], alpha, beta, signed) - flat[None]).square().mean(1)
    return alpha[err.argmin(), 0]


class _QuantMixin:
    """State and behaviour shared by QuantConv2d and QuantLinear."""

    def _setup(self, quantizer: WeightQuantizer, w_bits: float, a_bits: float, quantize_input: bool) -> None:
        self.quantizer = quantizer
        device = self.weight.device
        self.w_beta = nn.Parameter(torch.tensor(float(w_bits), device=device))
        self.w_scale = nn.Parameter(torch.tensor(quantizer.init_scale(self.weight), device=device))
        self.a_beta = nn.Parameter(torch.tensor(float(a_bits), device=device))
        self.a_alpha = nn.Parameter(torch.tensor(1.0, device=device))
        self.register_buffer("a_signed", torch.tensor(False, device=device))
        self.quantize_input = quantize_input  # False for the first layer: its input is the 8-bit image
        self.quant_enabled = True
        self.deployed = False  # weights already on their grid (a loaded checkpoint): used as they are
        self._calibrated = False  # Python flags, not tensors: no host sync in the forward pass
        self._signed = False
        self.reg_enabled = False
        self.reg_value: torch.Tensor | None = None
        # Set by prepare_step at the start of each forward pass of the model, used once: the
        # quantized weight, and the input quantizer's arguments (hwsearch.fused).
        self._w_next: torch.Tensor | None = None
        self._a_next: tuple | None = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quantizer={self.quantizer.name}, "
                f"w_bits={float(self.w_beta):.2f}, a_bits={float(self.a_beta):.2f}")

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        """Sign and starting clip of PACT from the first batch: the clip with the least squared
        quantization error at this layer's starting bits (100 candidates up to max|x|)."""
        signed = bool((x < 0).any())
        self.a_alpha.fill_(float(mse_clip(x, torch.round(self.a_beta.detach()), signed)))
        self.a_signed.fill_(signed)
        self._signed = signed
        self._calibrated = True

    def _quant_weight(self) -> torch.Tensor:
        w, self._w_next = self._w_next, None
        if w is not None:  # computed with every other layer's by prepare_step
            return w
        if self.deployed or not self.quant_enabled:
            self.reg_value = None
            return self.weight
        w_hat, u = self.quantizer.quantize(self.weight, self.w_beta, self.w_scale.abs() + 1e-8)
        self.reg_value = self.quantizer.penalty(u, self.w_beta) if self.reg_enabled else None
        return w_hat

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.quant_enabled and self.quantize_input):
            return x
        p, self._a_next = self._a_next, None
        if p is not None:  # the constants prepare_step made for all layers at once
            return FusedPact.apply(x, *p, self._signed)  # p = (α, β, constants row)
        if not self._calibrated:
            self._calibrate(x)
        return _PactQuant.apply(x, self.a_alpha.abs() + 1e-6, self.a_beta, self._signed)

    def bits(self) -> tuple[float, float]:
        return float(self.w_beta), float(self.a_beta)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x):
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


_SWAP = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def prepare_step(root: nn.Module, args=None) -> None:
    """Forward pre-hook of a quantized model (``quantize_model`` registers it): before the layers run,
    quantize every layer's weights (and compute their SINAREQ penalties) in one ``FusedWeights`` call
    per quantizer, and make every input quantizer's constants in one batch of vector operations
    (``pact_scalars``). Each layer takes what was made for it once; a layer called on its own, a
    quantizer without a fused form or a clip not yet calibrated uses the per-layer reference path.
    """
    layers = [m for m in root.modules() if isinstance(m, _QuantMixin)]
    if not layers:
        return
    groups: dict[int, list[_QuantMixin]] = {}
    for m in layers:
        m._w_next = m._a_next = None
        if m.quant_enabled and not m.deployed and m.quantizer.fused is not None:
            groups.setdefault(id(m.quantizer), []).append(m)
    for group in groups.values():
        with_penalty = any(m.reg_enabled for m in group)
        scale = stack_scalars([m.w_scale for m in group]).abs() + 1e-8
        beta = stack_scalars([m.w_beta for m in group])
        *w_hat, penalty = FusedWeights.apply(group[0].quantizer.fused, with_penalty, scale, beta,
                                             *[m.weight for m in group])
        penalties = penalty.unbind() if with_penalty else [None] * len(group)
        for m, w, p in zip(group, w_hat, penalties):
            m._w_next = w
            m.reg_value = p if m.reg_enabled else None
    acts = [m for m in layers if m.quant_enabled and m.quantize_input and m._calibrated]
    if acts:
        alpha = stack_scalars([m.a_alpha for m in acts]).abs() + 1e-6
        beta = stack_scalars([m.a_beta for m in acts])
        key = (tuple(m._signed for m in acts), alpha.device, alpha.dtype)
        cached = root.__dict__.get("_hwsearch_signed")
        if cached is None or cached[0] != key:  # made once, not copied to the device every step
            cached = (key, torch.tensor([float(s) for s in key[0]], device=alpha.device, dtype=alpha.dtype))
            root.__dict__["_hwsearch_signed"] = cached
        rows = pact_scalars(alpha, beta, cached[1])
        for m, a, b, row in zip(acts, alpha.unbind(), beta.unbind(), rows):
            m._a_next = (a, b, row)


def quantize_model(model: nn.Module, names: list[str], *, quantizer: str | WeightQuantizer = "dorefa",
                   w_bits: dict[str, float], a_bits: dict[str, float], first_layer: str | None = None) -> nn.Module:
    """Swap the named Conv2d/Linear modules for quantized ones, in place, keeping their names.

    Args:
        names: modules to quantize (from the layer table).
        w_bits, a_bits: initial (continuous) bits per name.
        first_layer: the layer whose input is the image; its input is not re-quantized.

    Returns:
        The same model object.
    """
    q = weight_quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    for name in names:
        module = model.get_submodule(name)
        cls = _SWAP.get(type(module))
        if cls is None:
            raise ValueError(f"layer {name!r}: cannot quantize {type(module).__name__} (Conv2d and Linear only)")
        module.__class__ = cls  # same parameters, same name; the new class adds quantizer state
        module._setup(q, w_bits[name], a_bits[name], quantize_input=name != first_layer)
    if not model.__dict__.get("_hwsearch_hooked"):
        model.register_forward_pre_hook(prepare_step)
        model.__dict__["_hwsearch_hooked"] = True
    return model


def quant_layers(model: nn.Module) -> dict[str, _QuantMixin]:
    """The quantized modules of a model by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantMixin)}


def take_penalties(layers: dict[str, _QuantMixin]) -> list[torch.Tensor]:
    """The SINAREQ penalties the last forward pass left on ``layers`` (those with ``reg_enabled``),
    handed over once: each layer's ``reg_value`` is cleared, so that no module keeps the step's
    autograd graph alive past its backward (a compiled step may not leave it on a module either)."""
    regs = []
    for m in layers.values():
        if m.reg_value is not None:
            regs.append(m.reg_value)
            m.reg_value = None
    return regs
