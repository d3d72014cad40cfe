"""Per-layer MAC table of a model, counted by fvcore and checked.

fvcore counts one multiply-add as one "flop". Its tracer is a private torch API and it
counts ops it does not know as zero with only a log line, so this module wraps it:
it registers handles for the MAC-bearing ops fvcore lacks (attention), and raises or
warns loudly when a MAC-bearing op remains uncounted.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn

__all__ = ["Layer", "LayerTable", "UncountedOpsError", "profile"]

# Ops whose MACs pair a weight with an activation; every other counted MAC op
# (matmul, bmm, einsum, attention) pairs two activations.
_WEIGHT_OPS = {"conv", "_convolution", "linear", "addmm"}
_MAC_OPS = _WEIGHT_OPS | {"matmul", "bmm", "mm", "einsum", "baddbmm", "scaled_dot_product_attention"}
# An op name that looks MAC-bearing and that fvcore skipped must not vanish silently.
_MAC_OP_PATTERN = re.compile(r"conv|mm|mv|matmul|linear|einsum|attention|bmm|dot|tensordot")
ACT_ACT_SUFFIX = "@matmul"


class UncountedOpsError(RuntimeError):
    """Raised when MAC-bearing ops in a model could not be counted."""


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: a module (or a module's activation matmuls) that carries MACs.

    ``name`` is the module's name in ``model.named_modules()``; for matmuls of two
    activations inside a module (attention) it is ``<module>@matmul``. ``has_weight``
    is False for those: both operands then use activation bits.
    """

    name: str
    op: str
    macs: int
    params: int
    has_weight: bool = True
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerTable:
    """The MAC-bearing layers of a model in execution order, and what was not quantized."""

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]
    other_params: int = 0
    other_macs: int = 0
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def column(self, attr: str, like: torch.Tensor) -> torch.Tensor:
        """A per-layer attribute (``macs``, ``params``, ``has_weight``) as a tensor on ``like``'s device
        and dtype, built once and cached: cost evaluation in a training step copies nothing from the host."""
        cache = self.__dict__.setdefault("_columns", {})
        key = (attr, like.device, like.dtype if attr != "has_weight" else torch.bool)
        if key not in cache:
            values = [getattr(layer, attr) for layer in self.layers]
            cache[key] = torch.tensor(values if attr == "has_weight" else [float(v) for v in values],
                                      dtype=key[2], device=like.device)
        return cache[key]

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"no layer named {name!r}")

    def __len__(self) -> int:
        return len(self.layers)


def _shape(value: Any) -> list[int] | None:
    t = value.type()
    if isinstance(t, torch._C.TensorType) and t.sizes() is not None:
        return list(t.sizes())
    return None


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    # softmax(Q K^T) V: L*S*E MACs for Q K^T and L*S*Ev for the product with V, per batch*head.
    q, k, v = (_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise UncountedOpsError("scaled_dot_product_attention with unknown shapes")
    batch = prod(q[:-2])
    length, emb = q[-2], q[-1]
    source, emb_v = k[-2], v[-1]
    return batch * length * source * (emb + emb_v)


def _native_mha_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    # Fused nn.MultiheadAttention (inference fast path): projections are weight MACs, the two
    # attention products pair activations. query (B, L, E), key/value (B, S, E).
    q, k = _shape(inputs[0]), _shape(inputs[1])
    if q is None or k is None:
        raise UncountedOpsError("_native_multi_head_attention with unknown shapes")
    batch, length, emb = prod(q[:-2]), q[-2], q[-1]
    source = k[-2]
    weight = batch * length * emb * emb * 2 + batch * source * emb * emb * 2  # q and out; k and v
    return Counter({"linear": weight, "scaled_dot_product_attention": batch * length * source * emb * 2})


def _baddbmm_handle(inputs: list[Any], outputs: list[Any]) -> int:
    a, b = _shape(inputs[1]), _shape(inputs[2])
    return prod(a) * b[-1]


_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_handle,
    "aten::baddbmm": _baddbmm_handle,
    "aten::_native_multi_head_attention": _native_mha_handle,
}


def _io_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []

    def make_hook(name: str):
        def hook(mod, args, out):
            if name in shapes:
                return
            ins = next((a for a in args if isinstance(a, torch.Tensor)), None)
            outs = out if isinstance(out, torch.Tensor) else next(
                (o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
            shapes[name] = (tuple(ins.shape) if ins is not None else (), tuple(outs.shape) if outs is not None else ())
        return hook

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _weight_params(module: nn.Module, called: set[str], prefix: str) -> int:
    """Weights (ndim >= 2) a module owns directly or through children that are never called."""
    total = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
    for child_name, child in module.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        if full not in called:
            total += _weight_params(child, called, full)
    return total


def profile(model: nn.Module, input_shape: tuple[int, ...] | list[int], *, strict: bool = True) -> LayerTable:
    """Count the MACs of every MAC-bearing layer of ``model`` at ``input_shape`` (batch 1).

    The model is traced in eval mode on CPU (a copy is not made; its mode is restored).

    Args:
        model: any ``nn.Module`` taking one tensor.
        input_shape: e.g. ``(1, 3, 32, 32)``.
        strict: raise ``UncountedOpsError`` when a MAC-bearing op is uncounted; when False,
            warn and record it in ``LayerTable.uncounted``.

    Returns:
        A ``LayerTable`` keyed by the names in ``model.named_modules()``.
    """
    with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    input_shape = tuple(int(s) for s in input_shape)
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = torch.zeros(input_shape, device=device)
        shapes = _io_shapes(model, example)
        analysis = FlopCountAnalysis(model, example)
        for op_name, handle in _EXTRA_HANDLES.items():
            analysis.set_op_handle(op_name, handle)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        fvcore_logger = logging.getLogger("fvcore")
        level = fvcore_logger.level
        fvcore_logger.setLevel(logging.ERROR)
        try:
            by_op = analysis.by_module_and_operator()
            unsupported = Counter(analysis.unsupported_ops())
            uncalled = set(analysis.uncalled_modules())
        finally:
            fvcore_logger.setLevel(level)
    finally:
        model.train(was_training)

    uncounted = {op: n for op, n in unsupported.items() if _MAC_OP_PATTERN.search(op)}
    if uncounted:
        msg = f"MAC-bearing ops that no handle counts: {dict(uncounted)}; their MACs are missing from the table"
        if strict:
            raise UncountedOpsError(msg)
        warnings.warn(msg, stacklevel=2)

    modules = dict(model.named_modules())
    called = set(modules) - uncalled
    layers: list[Layer] = []
    other_macs = 0
    quantized_weight_params = 0
    for name, module in modules.items():
        own = Counter(by_op.get(name, {}))
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            own.subtract(by_op.get(full, {}))
        weight_macs = sum(n for op, n in own.items() if op in _WEIGHT_OPS)
        act_macs = sum(n for op, n in own.items() if op in _MAC_OPS and op not in _WEIGHT_OPS)
        other_macs += sum(n for op, n in own.items() if op not in _MAC_OPS and n > 0)
        in_shape, out_shape = shapes.get(name, ((), ()))
        label = name or "(model)"
        if weight_macs > 0:
            params = _weight_params(module, called, name)
            quantized_weight_params += params
            layers.append(Layer(label, type(module).__name__, int(weight_macs), params, True, in_shape, out_shape))
        if act_macs > 0:
            layers.append(Layer(label + ACT_ACT_SUFFIX, "matmul", int(act_macs), 0, False, in_shape, out_shape))
    order = {name: i for i, name in enumerate(shapes)}
    layers.sort(key=lambda layer: order.get(layer.name.removesuffix(ACT_ACT_SUFFIX), len(order)))
    total_params = sum(p.numel() for p in model.parameters())
    return LayerTable(
        layers=tuple(layers),
        input_shape=input_shape,
        other_params=total_params - quantized_weight_params,
        other_macs=int(other_macs),
        uncounted=dict(uncounted),
    )
