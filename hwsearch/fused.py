"""Fused fake quantization: a training step in few, large operations.

The reference formulas live in ``hwsearch.quant`` (``WeightQuantizer.quantize``/``penalty`` and
``_PactQuant``), written with autograd and straight-through estimators, one layer at a time. Per
layer and step that is some twenty small operations forward and as many backward for the weights,
and as many again for the input: thousands of operator calls per step on ResNet-20, each a kernel
launch on a GPU and Python and dispatcher overhead on a CPU.

Here the same mathematics runs as:

* ``FusedWeights``: every layer's weight quantization and SINAREQ penalty in one autograd function
  whose forward and hand-written backward are ``torch._foreach_*`` operations over the list of
  weights (one call per operation for all layers; multi-tensor kernels on CUDA). Per-layer scalars
  (bits, steps, scales) are vectors with one entry per layer.
* ``FusedPact``: PACT on one layer's input in one autograd function: on a CPU one pass over the
  activation forward and one backward (a C++ kernel, ``hwsearch/csrc/pact_cpu.cpp``), elsewhere six
  ATen passes forward and five to six backward (the reference takes about eighteen); its per-layer
  scalars computed for all layers at once by ``pact_scalars``.

``quant.prepare_step``, a forward pre-hook on the quantized model, calls both at the start of each
forward pass; ``tests/test_fused.py`` checks values and every gradient against the reference.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FusedPact", "FusedWeights", "pact_scalars", "stack_scalars"]

LN2 = math.log(2.0)


def _sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums of a list as one vector, with two foreach reductions and no loop:
    Σx = Σx⁺ − Σ|x⁻| (foreach has an L1 norm but no signed sum)."""
    pos = torch._foreach_norm(torch._foreach_clamp_min(tensors, 0.0), 1)
    neg = torch._foreach_norm(torch._foreach_clamp_max(tensors, 0.0), 1)
    return torch.stack(pos) - torch.stack(neg)


_NUMEL: dict[tuple, torch.Tensor] = {}


def _numel(weights: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The weights' element counts as a vector on ``like``'s device, made once per set of shapes (not
    copied from the host every step)."""
    key = (tuple(w.numel() for w in weights), like.device, like.dtype)
    if key not in _NUMEL:
        _NUMEL[key] = torch.tensor([float(n) for n in key[0]], dtype=like.dtype, device=like.device)
    return _NUMEL[key]


class _StackScalars(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *scalars):
        return torch.stack(scalars)

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind()  # one operation; torch.stack's own backward selects entry by entry


def stack_scalars(scalars) -> torch.Tensor:
    """``torch.stack`` of 0-d tensors (per-layer parameters) into a vector whose backward hands the
    gradient back in one ``unbind``, not one ``select`` per entry."""
    return _StackScalars.apply(*scalars)


class FusedWeights(torch.autograd.Function):
    """Fake-quantize the weights of ``n`` layers with one quantizer (``"dorefa"`` or ``"wrpn"``) and,
    with ``with_penalty``, their SINAREQ penalties.

    Inputs: ``scale`` (n,) the weight scales s > 0, ``beta`` (n,) the continuous bitwidths, then the
    n weight tensors. Outputs: the n quantized weights, then the (n,) penalties (zeros without
    ``with_penalty``). The grid is that of b = round(β); gradients are the reference's straight-through
    ones: ∂q/∂u = 1, ∂q/∂Δ = round(u/Δ) − u/Δ, ∂b/∂β = 1; the penalty's 1/2^b is a constant.

    DoReFa: u = tanh(w)/(2 max|tanh w|) + 1/2 (the max a constant), Δ = 1/(2^b − 1), ŵ = s(2q − 1).
    WRPN:   u = clip(w/s, −1, 1), Δ = 1/(2^(b−1) − 1), ŵ = s q.
    Penalty: P = mean(sin²(π u/Δ)) / 2^b.
    """

    @staticmethod
    def forward(ctx, kind: str, with_penalty: bool, scale: torch.Tensor, beta: torch.Tensor, *weights):
        weights = list(weights)
        bits = torch.round(beta)
        two_b = torch.pow(2.0, bits)
        half = two_b / 2 if kind == "wrpn" else two_b  # 2^(b-1) or 2^b
        levels = half - 1  # 1/Δ
        if kind == "dorefa":
            t = torch._foreach_tanh(weights)
            # (torch.compile cannot trace _foreach_max; what it compiles it fuses anyway)
            top = [x.abs().amax() for x in t] if torch.compiler.is_compiling() else torch._foreach_max(torch._foreach_abs(t))
            inv2m = 0.5 / torch.stack(top).clamp_min(1e-8)
            u = torch._foreach_mul(t, inv2m.unbind())
            torch._foreach_add_(u, 0.5)
            v = None
        elif kind == "wrpn":
            t = inv2m = None
            v = torch._foreach_mul(weights, (1.0 / scale).unbind())
            u = torch._foreach_clamp_max(torch._foreach_clamp_min(v, -1.0), 1.0)
        else:
            raise ValueError(f"FusedWeights: unknown quantizer {kind!r}")
        z = torch._foreach_mul(u, levels.unbind())  # u/Δ
        r = torch._foreach_round(z)
        if kind == "dorefa":  # ŵ = s(2r/L − 1)
            w_hat = torch._foreach_mul(r, (2 * scale / levels).unbind())
            torch._foreach_sub_(w_hat, scale.unbind())
        else:  # ŵ = s r/L
            w_hat = torch._foreach_mul(r, (scale / levels).unbind())
        per_elem = 1.0 / (_numel(weights, scale) * two_b)  # the penalty's 1/(N 2^b)
        if with_penalty:
            s = torch._foreach_sin(torch._foreach_mul(z, math.pi))
            penalty = torch.stack(torch._foreach_norm(s, 2)).square() * per_elem
        else:
            penalty = torch.zeros_like(scale)
        ctx.kind, ctx.with_penalty = kind, with_penalty
        # c = π/(N 2^b Δ): ∂P/∂u = c sin(2πu/Δ)
        ctx.save_for_backward(scale, levels, half, math.pi * levels * per_elem,
                              *(inv2m,) if inv2m is not None else ())
        ctx.lists = (t, u, v, z, r)
        if not with_penalty:
            ctx.mark_non_differentiable(penalty)
        return (*w_hat, penalty)

    @staticmethod
    def backward(ctx, *grads):
        kind = ctx.kind
        scale, levels, half, coef, *rest = ctx.saved_tensors
        t, u, v, z, r = ctx.lists
        n = len(z)
        g = list(grads[:n])
        g_pen = grads[n]
        need_s, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_w = any(ctx.needs_input_grad[4:])
        # ∂L/∂u = ∂L/∂ŵ · ∂ŵ/∂u + ∂L/∂P · ∂P/∂u,  ∂ŵ/∂u = 2s (DoReFa) or s (WRPN),
        # ∂P/∂u = c sin(2π u/Δ) with c = π/(N 2^b Δ).
        dw_du = 2 * scale if kind == "dorefa" else scale
        g_u = torch._foreach_mul(g, dw_du.unbind())
        sin2 = None
        if ctx.with_penalty:
            sin2 = torch._foreach_sin(torch._foreach_mul(z, 2 * math.pi))
            torch._foreach_add_(g_u, torch._foreach_mul(sin2, (g_pen * coef).unbind()))
        if kind == "wrpn":  # the clip passes gradient inside [−1, 1] (bounds included), ∂u/∂w = 1/s
            inside = torch._foreach_abs(v)
            torch._foreach_sub_(inside, 1.0)
            torch._foreach_clamp_min_(inside, 0.0)
            torch._foreach_sign_(inside)
            torch._foreach_neg_(inside)
            torch._foreach_add_(inside, 1.0)
            torch._foreach_mul_(g_u, inside)
        g_w = None
        if need_w:
            if kind == "dorefa":  # ∂u/∂w = (1 − tanh²w)/(2 max|tanh w|)
                d = torch._foreach_mul(t, t)
                torch._foreach_neg_(d)
                torch._foreach_add_(d, 1.0)
                g_w = torch._foreach_mul(g_u, d)
                torch._foreach_mul_(g_w, rest[0].unbind())
            else:
                g_w = torch._foreach_mul(g_u, (1.0 / scale).unbind())
        g_scale = g_beta = None
        if need_s or need_b:
            # One batch of per-layer sums: Σ g·r, Σ g, Σ g·(r − z) [, Σ sin2·z] [, Σ g_u·u (WRPN)].
            err = torch._foreach_sub(r, z)
            terms = [*torch._foreach_mul(g, r), *g, *torch._foreach_mul(g, err)]
            if sin2 is not None:
                terms += torch._foreach_mul(sin2, z)
            if kind == "wrpn":
                terms += torch._foreach_mul(g_u, u)
            sums = _sums(terms).view(-1, n)
            g_r, g_sum, g_err = sums[0], sums[1], sums[2]
            if need_s:
                if kind == "dorefa":  # ŵ = s(2q − 1)
                    g_scale = 2 * g_r / levels - g_sum
                else:  # ŵ = s q(u(s)): q + s ∂q/∂s = q − u inside the clip
                    g_scale = g_r / levels - sums[-1] / scale
            if need_b:
                # ∂ŵ/∂Δ = (2s or s)·(r − z); ∂P/∂Δ = −c Σ sin(2πz)·z; ∂Δ/∂b = −ln2·2^b'/L² (b' = b or b − 1).
                g_delta = g_err * dw_du
                if sin2 is not None:
                    g_delta = g_delta - g_pen * coef * sums[3]
                g_beta = g_delta * (-LN2 * half / levels.square())
        return (None, None, g_scale, g_beta, *(g_w if g_w is not None else [None] * n))


def pact_scalars(alpha: torch.Tensor, beta: torch.Tensor, signed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-layer constants of ``FusedPact`` for all layers at once: vectors in, one row per layer
    out, ``[α, lo, Δ, 1/Δ, −lo/Δ, k_α, k_β]`` with k_α and k_β the gradients of ŷ in α and β per unit
    of rounding error.

    ``alpha`` (n,) the clips (positive), ``beta`` (n,) the bitwidths, ``signed`` (n,) 0/1.
    """
    with torch.no_grad():
        bits = torch.round(beta)
        two_b = torch.pow(2.0, bits)
        levels = two_b - 1
        lo = -alpha * signed
        span = alpha - lo
        inv = levels / span
        k_alpha = (1 + signed) / levels
        k_beta = -span * LN2 * two_b / levels.square()
        rows = torch.stack([alpha, lo, span / levels, inv, -lo * inv, k_alpha, k_beta], dim=1)
    return rows.unbind()


def _kernel_for(x: torch.Tensor):
    """The one-pass CPU kernels where they apply (float or double on a CPU, eager), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return None
    from .cpu_kernels import pact_ops

    return pact_ops()


class FusedPact(torch.autograd.Function):
    """PACT on one layer's input at b = round(β).

    y = clip(x, lo, α), lo = −α (signed) or 0; Δ = (α − lo)/(2^b − 1); ŷ = lo + Δ round((y − lo)/Δ).
    Gradients as the reference ``_PactQuant``: x straight through inside [lo, α]; α gets 1 above the
    clip, −1 below it when signed, and the step-size term (r − t)·∂Δ/∂α inside; β the step-size term.
    ``consts`` is the layer's row from ``pact_scalars`` (no per-layer scalar arithmetic here).

    On a CPU this is one pass forward and one backward (``hwsearch/csrc/pact_cpu.cpp``, saving one
    tensor: the rounding error, with the clip side coded as ±2). Elsewhere (CUDA, other dtypes,
    ``torch.compile``, or no compiler to build the kernel) it is a few ATen passes, most in place,
    saving the clip side as a sign and the rounding error.
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, consts, signed: bool):
        ctx.signed = signed
        ops = _kernel_for(x)
        ctx.kernel = ops
        if ops is not None:
            out, code = ops.pact_forward(x, consts, signed)
            ctx.save_for_backward(code, consts)
            return out
        alpha, lo, delta, inv, offset, k_alpha, k_beta = consts.unbind()
        t = torch.clamp_max(x, alpha)  # clamp with tensor bounds is several times slower on a CPU
        if signed:
            t.clamp_min_(lo)
        else:
            t.clamp_min_(0.0)
        side = torch.sub(x, t).sign_()  # +1 above the clip, −1 below, 0 inside
        t.mul_(inv)  # (y − lo)/Δ
        if signed:
            t.add_(offset)
        r = torch.round(t)
        err = torch.sub(r, t, out=t)  # r − t, in t's memory
        out = r.mul_(delta)
        if signed:
            out.add_(lo)
        ctx.save_for_backward(side, err, k_alpha, k_beta)
        return out

    @staticmethod
    def backward(ctx, g):
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        if ctx.kernel is not None:
            code, consts = ctx.saved_tensors
            gx, g_ab = ctx.kernel.pact_backward(g, code, consts, ctx.signed, need_x)
            g_alpha, g_beta = g_ab.unbind()
            return gx if need_x else None, g_alpha, g_beta, None, None
        side, err, k_alpha, k_beta = ctx.saved_tensors
        gx = torch.addcmul(g, g, side.abs(), value=-1.0) if need_x else None  # g where side == 0
        g_alpha = g_beta = None
        if need_a or need_b:
            g_err = torch.sum(g * err)
            if need_a:
                # below an unsigned clip the output is the constant 0: only the side above counts
                g_clip = torch.sum(g * (side if ctx.signed else torch.relu(side)))
                g_alpha = g_clip + k_alpha * g_err
            if need_b:
                g_beta = k_beta * g_err
        return gx, g_alpha, g_beta, None, None
