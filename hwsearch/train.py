"""Training loops: FP32 pre-training (cached), and one loop that SINAREQ, fixed-bit QAT and
plan verification all share. Data stays on the device; the loop syncs with the host only at
logging points (every ``log_every`` steps), not per step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import TensorData, cache_dir
from .optim import ScalarAdam
from .units import slug

__all__ = ["NonFiniteLoss", "StepHook", "evaluate", "fit", "fp32_checkpoint", "recalibrate_bn", "resolve_device"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, batch_size: int = 1000) -> float:
    """Top-1 accuracy on the test split, in [0, 1]."""
    was = model.training
    model.eval()
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    for x, y in data.test_batches(batch_size):
        correct += (model(x).argmax(1) == y).sum()
    model.train(was)
    return float(correct) / len(data.y_test)


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
    model.train(was)
    return len(norms)


@dataclass
class StepHook:
    """Extra terms and actions for ``fit``: ``loss(step, total)`` returns (extra loss, logs dict of
    0-d tensors); ``after_step(step, total)`` runs after the optimizer steps (clamping, freezing)."""

    loss: Callable[[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    after_step: Callable[[int, int], None] | None = None


def fit(model: nn.Module, data: TensorData, *, epochs: int, lr: float, batch_size: int, seed: int,
        quant_params: list[nn.Parameter] | None = None, lr_quant: float = 0.01, weight_decay: float = 5e-4,
        hook: StepHook | None = None, log_every: int = 20, progress: bool = False, desc: str = "train",
        history: list[dict] | None = None, compile: bool = False, shared_norm=()) -> list[dict]:
    """Train ``model`` on ``data`` with SGD (one-cycle learning rate) for the network weights and
    Adam for the quantizer parameters (bitwidths, scales, clips); those in ``shared_norm`` share
    one Adam second moment (``ScalarAdam``'s ``shared``).

    With ``compile``, the forward (and so the backward) runs through ``torch.compile``, and so does
    the quantizer parameters' Adam step: on a GPU it fuses the many small fake-quantization kernels;
    it pays for its compile time on long runs.

    Returns the history: one dict per logging point (step, loss and the hook's logs).

    Raises:
        NonFiniteLoss: the loss became NaN/inf (checked at every logging point; names the first bad step).
    """
    from tqdm.auto import tqdm

    history = [] if history is None else history
    quant_ids = {id(p) for p in (quant_params or [])}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    steps_per_epoch = max(1, len(data.y_train) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.SGD(weights, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15,
                                                anneal_strategy="linear")
    quant = [p for p in (quant_params or []) if p.requires_grad]
    if shared_norm and not all(p.dim() == 0 for p in quant):
        raise ValueError("fit: shared_norm needs 0-d quantizer parameters (ScalarAdam)")
    qopt = (ScalarAdam(quant, lr=lr_quant, shared=shared_norm) if all(p.dim() == 0 for p in quant)
            else torch.optim.Adam(quant, lr=lr_quant)) if quant_params else None
    if compile and isinstance(qopt, ScalarAdam):  # one graph (tests/test_fused.py)
        qopt.step = torch.compile(qopt.step, fullgraph=True)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    # On CUDA: bf16 autocast and channels-last convolutions (tensor cores); CPU stays FP32.
    cuda = data.device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    first_bad = torch.full((), -1, device=data.device, dtype=torch.long)
    running = {}
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for _ in range(epochs):
            for x, y in data.train_batches(batch_size, gen):
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    loss = F.cross_entropy(forward(x), y)
                logs = {"task_loss": loss.detach()}
                if hook and hook.loss:
                    extra, extra_logs = hook.loss(step, total)
                    extra = extra.float()
                    loss = loss + extra
                    logs.update(extra_logs)
                # Record the first non-finite step on the device; checked at logging points only.
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
                opt.zero_grad(set_to_none=True)
                if qopt:
                    qopt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if qopt:
                    qopt.step()
                sched.step()
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
                    row = {"phase": desc, "step": step, **{k: v / n for k, (v, n) in sums.items()}}
                    history.append(row)
                    running = {}
                    bar.set_postfix(loss=f"{row['task_loss']:.3f}")
                bar.update(1)
    finally:
        bar.close()
    return history


def _ckpt_path(model_name: str, data: TensorData, epochs: int, seed: int, lr: float, batch_size: int) -> Path:
    # Keyed by model, dataset (and subset), epochs and seed, and the recipe (lr, batch size).
    key = json.dumps([model_name, data.name, len(data.y_train), len(data.y_test), epochs, seed, lr, batch_size])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{slug(model_name, 200)}-{digest}.pt"


def fp32_checkpoint(model_name: str, model: nn.Module, data: TensorData, *, epochs: int, seed: int,
                    lr: float = 0.1, batch_size: int = 128, progress: bool = False) -> dict:
    """Load the cached FP32 weights for (model, dataset, epochs, seed) into ``model``, training and
    caching them first when absent. A cache file that fails to load or does not match the model
    is treated as absent and replaced.

    Returns ``{"top1": float, "path": str, "cached": bool}``.
    """
    path = _ckpt_path(model_name, data, epochs, seed, lr, batch_size)
    if path.exists():
        try:
            blob = torch.load(path, map_location=data.device, weights_only=True)
            model.load_state_dict(blob["state_dict"])
            top1 = float(blob["top1"])
            if math.isfinite(top1):
                return {"top1": top1, "path": str(path), "cached": True}
        except Exception:
            pass  # corrupt or stale: retrain below
    fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, desc="fp32")
    top1 = evaluate(model, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"state_dict": model.state_dict(), "top1": top1}, tmp)
    os.replace(tmp, path)
    return {"top1": top1, "path": str(path), "cached": False}
