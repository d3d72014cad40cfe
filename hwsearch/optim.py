"""Adam for the quantizers' many scalar parameters, as one vector.

Every quantized layer has four 0-d parameters (weight bits, weight scale, input bits, input clip).
``torch.optim.Adam`` steps them one by one on a CPU (its foreach path reads each parameter's step
count on the host), which on ResNet-20 is several hundred operator calls per training step for
eighty numbers. ``ScalarAdam`` keeps the moments and step counts of all of them in vectors and
applies one update: a dozen vector operations, no host synchronization. The arithmetic is Adam's
(Kingma & Ba 2015, PyTorch's defaults: no weight decay, no amsgrad), and a parameter whose gradient
is ``None`` in a step is skipped as torch's Adam skips it (tests/test_fused.py compares the two).
"""

from __future__ import annotations

import torch

__all__ = ["OneCycleSGD", "ScalarAdam", "one_cycle"]


class ScalarAdam:
    """Adam over 0-d parameters held as one vector of moments (``step``, ``zero_grad`` as torch optimizers).

    ``shared``: parameters (a subset of ``params``) that divide by one second moment, the mean of
    theirs, instead of each by its own: they then move in proportion to their gradients, as SGD on a
    normalized gradient would, where Adam moves each at about ``lr`` whatever its gradient's size.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 shared=()) -> None:
        self.params = list(params)
        if any(p.dim() != 0 for p in self.params):
            raise ValueError("ScalarAdam: every parameter must be 0-d")
        shared_ids = {id(p) for p in shared}
        self.lr, self.betas, self.eps = lr, betas, eps
        like = self.params[0] if self.params else torch.zeros(())
        n = len(self.params)
        self.exp_avg = like.new_zeros(n).detach()
        self.exp_avg_sq = like.new_zeros(n).detach()
        self.steps = like.new_zeros(n).detach()
        self._zero = like.new_zeros(()).detach()
        flags = [id(p) in shared_ids for p in self.params]
        self.shared = None
        if any(flags):  # (mask, the mask's weights of a mean): no boolean indexing, so no host sync
            mask = torch.tensor(flags, dtype=torch.bool, device=like.device)
            self.shared = (mask, mask.to(like.dtype) / sum(flags))
        self._weights: dict[tuple[bool, ...], tuple[torch.Tensor, ...]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if not self.params:
            return
        have = tuple(p.grad is not None for p in self.params)
        if not any(have):
            return
        b1, b2 = self.betas
        # Made once per pattern (the pattern changes when bits freeze), not every step; in a compiled
        # step they are constants of the graph, and a cache would only add a guard.
        weights = None if torch.compiler.is_compiling() else self._weights.get(have)
        if weights is None:
            mask = torch.tensor(have, dtype=self.steps.dtype, device=self.steps.device)
            weights = (mask, (1 - b1) * mask, 1 - (1 - b2) * mask, -self.lr * mask)
            if not torch.compiler.is_compiling():
                self._weights[have] = weights
        mask, avg_weight, sq_decay, step_size = weights
        g = torch.stack([p.grad if p.grad is not None else self._zero for p in self.params])  # 0 where skipped
        self.steps.add_(mask)
        self.exp_avg.lerp_(g, avg_weight)
        self.exp_avg_sq.mul_(sq_decay).addcmul_(g, g, value=1 - b2)
        steps = self.steps.clamp_min(1)
        bias1 = 1 - torch.pow(b1, steps)
        second = self.exp_avg_sq / (1 - torch.pow(b2, steps))
        if self.shared is not None:  # one second moment for the shared ones: the mean of theirs
            mask, mean_weights = self.shared
            second = torch.where(mask, second @ mean_weights, second)
        denom = second.sqrt_().add_(self.eps)
        update = self.exp_avg / (bias1 * denom) * step_size
        torch._foreach_add_(self.params, update.unbind())


def one_cycle(opt: torch.optim.Optimizer, lr: float, total: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The weights' schedule, the one place it is set: one cycle over ``total`` steps peaking at ``lr``
    after 15% of them, linear both ways (it cycles SGD's momentum too, 0.95 → 0.85 → 0.95)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15,
                                               anneal_strategy="linear")


class OneCycleSGD:
    """SGD with Nesterov momentum and weight decay under a one-cycle schedule, steppable inside one
    compiled graph: what ``fit`` uses with ``compile``.

    ``torch.optim.SGD.step`` breaks a ``torch.compile`` graph on purpose (around every optimizer
    step) and ``OneCycleLR`` changes Python floats between steps, which a compiled step would bake
    in as constants. Here the learning rate and the momentum of every step are made up front by
    ``one_cycle`` (``OneCycleLR``) itself, on a throw-away optimizer, into two device vectors
    indexed by the step as a 0-d tensor; the update is torch's multi-tensor SGD written with
    ``_foreach`` operations:
    g ← ∇ + wd·p; b ← m·b + g (b starts at 0, so the first b is g, as torch's); p ← p − lr·(g + m·b).
    Equal to ``torch.optim.SGD`` under ``OneCycleLR`` up to float rounding (tests/test_fused.py).
    """

    def __init__(self, params, *, lr: float, total: int, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        like = self.params[0] if self.params else torch.zeros(())
        probe = torch.optim.SGD([torch.zeros((), requires_grad=True)], lr=lr, momentum=0.9, nesterov=True)
        sched = one_cycle(probe, lr, total)
        lrs, moms = [], []
        for i in range(total):
            lrs.append(probe.param_groups[0]["lr"])
            moms.append(probe.param_groups[0]["momentum"])
            if i + 1 < total:  # OneCycleLR refuses to step past total_steps
                probe.step()
                sched.step()
        self.lr = torch.tensor(lrs, dtype=like.dtype, device=like.device)
        self.momentum = torch.tensor(moms, dtype=like.dtype, device=like.device)
        self.weight_decay = weight_decay
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, i: torch.Tensor) -> None:
        """One update with the schedule's values at step ``i`` (a 0-d integer tensor on the device)."""
        have = [k for k, p in enumerate(self.params) if p.grad is not None]  # as torch: no gradient, no step
        if not have:
            return
        params = [self.params[k] for k in have]
        bufs = [self.buffers[k] for k in have]
        # index_select, not lr[i]: indexing with a tensor gives a size Dynamo cannot see ahead of time
        k = i.reshape(1)
        lr, m = self.lr.index_select(0, k).squeeze(0), self.momentum.index_select(0, k).squeeze(0)
        g = torch._foreach_add([p.grad for p in params], params, alpha=self.weight_decay)
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, g)
        torch._foreach_add_(g, torch._foreach_mul(bufs, m))
        torch._foreach_add_(params, torch._foreach_mul(g, -lr))
