"""Training loops: FP32 pre-training (cached), and one loop that SINAREQ, fixed-bit QAT and
plan verification all share. Data stays on the device; the loop syncs with the host only at
logging points (every ``log_every`` steps), not per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import dist
from .data import TensorData, cache_dir
from .files import atomic_path
from .optim import OneCycleSGD, ScalarAdam, one_cycle
from .units import slug

__all__ = ["NonFiniteLoss", "StepHook", "evaluate", "fit", "fp32_checkpoint", "model_digest", "recalibrate_bn",
           "resolve_device"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def evaluate(model: nn.Module, data) -> float:
    """The data's metric on its test split (higher is better): top-1 in [0, 1] unless the source
    carries a user's ``eval_fn``."""
    return data.score(model)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: TensorData, *, batches: int = 20, batch_size: int = 128,
                   seed: int = 0) -> int:
    """Re-estimate every batch norm's running statistics for the model as it is now.

    Running statistics are exponential averages over the last training steps. When a layer's
    grid changes late in training (a learned bitwidth crossing a half-integer, the freeze and
    budget projection), the averages still hold the old grid's activations while the batch
    statistics the weights were trained with do not: the model evaluates worse than it trains.
    Averaging the statistics over ``batches`` training batches (no gradient) removes that gap.

    Returns the number of batch-norm modules recalibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    gen = torch.Generator(device=data.device).manual_seed(seed)
    cuda = data.device.type == "cuda"
    epochs = itertools.chain.from_iterable(data.train_batches(batch_size, gen) for _ in itertools.count())
    for x, _ in itertools.islice(epochs, batches):
        if cuda:  # as in fit: channels-last, bf16 autocast
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    # Under torchrun each rank saw its own batches: average, so that every rank holds the same model.
    dist.all_mean_([t for m in norms for t in (m.running_mean, m.running_var)])
    model.train(was)
    return len(norms)


@dataclass
class StepHook:
    """Extra terms and actions for ``fit``.

    ``loss(step, total)`` returns (extra loss, logs dict of 0-d tensors); ``project()`` runs right
    after the optimizer steps, inside the training step (clamps and projections: tensor operations
    only, so that a compiled step stays one graph); ``after_step(step, total)`` runs after the step,
    outside it (host-side decisions such as the freeze). ``step`` is a Python int in an eager step
    and a 0-d integer tensor in a compiled one.
    """

    loss: Callable[[int | torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    after_step: Callable[[int, int], None] | None = None
    project: Callable[[], None] | None = None


class _EagerSGD:
    """torch's SGD under ``one_cycle``, stepped as ``OneCycleSGD`` is (``step(i)`` steps both)."""

    def __init__(self, params, *, lr: float, total: int, weight_decay: float) -> None:
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        self.sched = one_cycle(self.opt, lr, total)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self, i) -> None:
        self.opt.step()
        self.sched.step()


def fit(model: nn.Module, data: TensorData, *, epochs: int, lr: float, batch_size: int, seed: int,
        quant_params: list[nn.Parameter] | None = None, lr_quant: float = 0.01, weight_decay: float = 5e-4,
        hook: StepHook | None = None, log_every: int = 20, progress: bool = False, desc: str = "train",
        history: list[dict] | None = None, compile: bool = False, shared_norm=()) -> list[dict]:
    """Train ``model`` on ``data`` with SGD (one-cycle learning rate) for the network weights and
    Adam for the quantizer parameters (bitwidths, scales, clips); those in ``shared_norm`` share
    one Adam second moment (``ScalarAdam``'s ``shared``).

    With ``compile``, the whole training step (forward, loss terms, backward, both optimizer steps
    and the hook's projection) is one ``torch.compile`` graph (``fullgraph=True``; Dynamo traces the
    backward with ``trace_autograd_ops``), the weights stepped by ``OneCycleSGD``; on CUDA it is
    compiled with ``mode="reduce-overhead"``, which captures it as a CUDA graph (shapes are static:
    the last partial batch is dropped). It pays for its compile time on long runs.

    Returns the history: one dict per logging point (step, seconds since the start of ``fit``, loss
    and the hook's logs; a logging point waits for the device, so its time is the steps' time).

    Raises:
        NonFiniteLoss: the loss became NaN/inf (checked at every logging point; names the first bad step).
    """
    from tqdm.auto import tqdm

    history = [] if history is None else history
    quant_ids = {id(p) for p in (quant_params or [])}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    steps_per_epoch = data.steps_per_epoch(batch_size)
    total = max(1, epochs * steps_per_epoch)
    sgd = (OneCycleSGD(weights, lr=lr, total=total, weight_decay=weight_decay) if compile
           else _EagerSGD(weights, lr=lr, total=total, weight_decay=weight_decay))
    quant = [p for p in (quant_params or []) if p.requires_grad]
    if shared_norm and not all(p.dim() == 0 for p in quant):
        raise ValueError("fit: shared_norm needs 0-d quantizer parameters (ScalarAdam)")
    qopt = (ScalarAdam(quant, lr=lr_quant, shared=shared_norm) if all(p.dim() == 0 for p in quant)
            else torch.optim.Adam(quant, lr=lr_quant)) if quant_params else None
    if compile and qopt is not None and not isinstance(qopt, ScalarAdam):
        raise ValueError("fit: compile needs 0-d quantizer parameters (torch's Adam breaks the step's graph)")
    gen = torch.Generator(device=data.device).manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    # On CUDA: bf16 autocast and channels-last convolutions (tensor cores); CPU stays FP32.
    cuda = data.device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    first_bad = torch.full((), -1, device=data.device, dtype=torch.long)

    def zero_grad() -> None:
        sgd.zero_grad(set_to_none=True)
        if qopt:
            qopt.zero_grad(set_to_none=True)

    # Under torchrun, DistributedDataParallel averages the gradients of everything that trains (network
    # weights, learned bits, scales, clips) over the ranks, so every rank steps identically. It is built
    # again whenever the set of trained parameters changes (SINAREQ's freeze stops the bits).
    ddp: dict = {"net": model, "trained": None}

    def net() -> nn.Module:
        if dist.world_size() > 1:
            trained = tuple(id(p) for p in model.parameters() if p.requires_grad)
            if trained != ddp["trained"]:
                from torch.nn.parallel import DistributedDataParallel

                # Some trained tensors get no gradient in a step (a clip whose input is not quantized, a
                # DoReFa scale): DDP must look for them.
                ddp["net"] = DistributedDataParallel(model, device_ids=[data.device.index] if cuda else None,
                                                     find_unused_parameters=True)
                ddp["trained"] = trained
        return ddp["net"]

    if compile and dist.world_size() > 1:
        raise ValueError("--compile: not supported with several processes yet; run without it under torchrun")

    def train_step(x: torch.Tensor, y: torch.Tensor, i) -> dict[str, torch.Tensor]:
        """Forward, loss terms, backward, both optimizers and the projection; returns the step's logs."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = data.loss(net()(x), y)
        logs = {"task_loss": loss.detach()}
        if hook and hook.loss:
            extra, extra_logs = hook.loss(i, total)
            loss = loss + extra.float()
            logs.update(extra_logs)
        # Record the first non-finite step on the device; checked at logging points only.
        bad = ~torch.isfinite(loss.detach())
        first_bad.copy_(torch.where(bad & (first_bad < 0), i, first_bad))
        if not compile:  # see below
            zero_grad()
        loss.backward()
        sgd.step(i)
        if qopt:
            qopt.step()
        if compile:
            # Compiled, the gradients are dropped at the end of the step, so that none leaves the graph
            # (a CUDA graph's outputs are overwritten by its next replay). Eager, they are dropped just
            # before the backward, as torch's examples do: dropping them at the end made a quantized
            # step slower on 2 CPU cores (bench/step_time.py, runs alternated with and without it;
            # figures in the message of commit 7990873).
            zero_grad()
        if hook and hook.project:
            hook.project()
        return logs

    zero_grad()  # gradients left by earlier work (a sensitivity pass) would be added to
    step_fn, index = train_step, None
    if compile:
        # A fresh Dynamo cache: earlier fits' steps guard on their own models and optimizers, are never
        # run again, and would count against Dynamo's recompile limit (past it, steps run eagerly).
        torch._dynamo.reset()
        step_fn = torch.compile(train_step, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        index = torch.arange(total, device=data.device)  # the step as a tensor: one graph for all steps
        for t in (first_bad, sgd.lr, sgd.momentum, *sgd.buffers,
                  *((qopt.exp_avg, qopt.exp_avg_sq, qopt.steps) if qopt else ())):
            torch._dynamo.mark_static_address(t)  # state the step updates in place: fixed for CUDA graphs
    running = {}
    step = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True) if compile else contextlib.nullcontext():
            for _ in range(epochs):
                for x, y in data.train_batches(batch_size, gen):
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    logs = step_fn(x, y, step if index is None else index[step])
                    if hook and hook.after_step:
                        hook.after_step(step, total)
                    # One vector per step for all logged values (two operations, not two per value).
                    keys = tuple(logs)
                    with torch.no_grad():
                        values = torch.stack([v.float() for v in logs.values()])
                    group = running.get(keys)
                    running[keys] = (values, 1) if group is None else (group[0] + values, group[1] + 1)
                    step += 1
                    if step % log_every == 0 or step == total:
                        bad_step = int(first_bad)
                        if bad_step >= 0:
                            raise NonFiniteLoss(f"the loss became non-finite at step {bad_step} of {desc}; "
                                                f"try a lower learning rate or regularizer strength")
                        sums: dict[str, tuple[float, int]] = {}
                        for keys, (values, n) in running.items():
                            for k, v in zip(keys, values.tolist()):
                                total_k, count_k = sums.get(k, (0.0, 0))
                                sums[k] = (total_k + v, count_k + n)
                        row = {"phase": desc, "step": step, "seconds": time.perf_counter() - start,
                               **{k: v / n for k, (v, n) in sums.items()}}
                        history.append(row)
                        running = {}
                        bar.set_postfix(loss=f"{row['task_loss']:.3f}")
                    bar.update(1)
    finally:
        bar.close()
    dist.sync_buffers(model)
    return history


def model_digest(model: nn.Module) -> str:
    """A digest of a model as built: its structure (``repr``: every module and its settings), the source of
    every module class it uses (a changed ``forward`` with the same tensors changes the digest), and every
    tensor's name, shape, dtype and values. A factory changed in any of these gets a digest of its own."""
    import inspect

    h = hashlib.sha256(repr(model).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # built in C, or defined where no source is kept
            source = ""
        h.update(f"{cls.__module__}.{cls.__qualname__}:{source}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _ckpt_path(model_name: str, data: TensorData, epochs: int, seed: int, lr: float, batch_size: int,
               init: str = "") -> Path:
    # Keyed by model (its name and ``model_digest`` of its initial state), dataset (its name, which for an
    # ImageFolder holds its content key, and subset), epochs and seed, and the recipe (lr, batch size).
    key = json.dumps([model_name, init, data.name, data.content, data.n_train, data.n_test, data.mean,
                      data.std, epochs, seed, lr, batch_size])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{slug(model_name, 200)}-{digest}.pt"


def fp32_checkpoint(model_name: str, model: nn.Module, data: TensorData, *, epochs: int, seed: int,
                    lr: float = 0.1, batch_size: int = 128, progress: bool = False) -> dict:
    """Load the cached FP32 weights for (model, dataset, epochs, seed) into ``model``, training and
    caching them first when absent. The key includes ``model_digest(model)`` as given (freshly built,
    untrained), so a changed factory or architecture gets a checkpoint of its own. A cache file that
    fails to load or does not match the model is treated as absent and replaced.

    Under torchrun rank 0 decides whether the cache holds it (every rank then loads it), or all ranks
    train it once together and rank 0 writes it.

    Returns ``{"top1": float, "path": str, "cached": bool}``.
    """
    path = _ckpt_path(model_name, data, epochs, seed, lr, batch_size, model_digest(model))

    def load() -> float | None:
        try:
            blob = torch.load(path, map_location=data.device, weights_only=True)
            model.load_state_dict(blob["state_dict"])
            top1 = float(blob["top1"])
            return top1 if math.isfinite(top1) else None
        except Exception:
            return None  # absent, corrupt or stale: trained below

    top1 = dist.broadcast_object(load() if dist.is_main() else None)
    if top1 is not None:
        if not dist.is_main():
            load()
        return {"top1": top1, "path": str(path), "cached": True}
    fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, desc="fp32")
    top1 = evaluate(model, data)
    if dist.is_main():
        with atomic_path(path) as tmp:
            torch.save({"state_dict": model.state_dict(), "top1": top1}, tmp)
    dist.barrier()
    return {"top1": top1, "path": str(path), "cached": False}
