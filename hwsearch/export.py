"""The trained quantized model as output: a checkpoint with integer weights, and ONNX with Q/DQ nodes.

The checkpoint (``model.pt``) is written and read by ``hwsearch.checkpoint``; this module turns the
model ``load_quantized`` rebuilds into ONNX.

``export_onnx`` writes an ONNX graph (opset 21) in which every quantized layer's weight is an
integer initializer behind a DequantizeLinear, and its input passes Clip → QuantizeLinear →
DequantizeLinear at the layer's clip and bits; other layers stay float. Runtimes compute such a
graph in int8 containers (or in float after dequantizing): the plan's accuracy is kept, and speed at
b < 8 bits needs low-bit kernels that the runtime may not have.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .checkpoint import ExportError, load_quantized
from .files import atomic_path
from .quant import _QuantMixin, quant_layers

__all__ = ["ExportError", "export_onnx", "load_quantized", "onnx_top1"]

OPSET = 21  # DequantizeLinear on int16 (8-bit DoReFa codes) needs opset 21


def _smallest_int(codes: torch.Tensor) -> torch.Tensor:
    low, high = int(codes.min()), int(codes.max())
    dtype = torch.int8 if low >= -128 and high <= 127 else torch.int16
    return codes.to(dtype)


# ---------------------------------------------------------------- ONNX
def _float_copy(model: nn.Module) -> nn.Module:
    """The deployed model with its quantized layers as plain Conv2d/Linear (their weights are on the grid)."""
    plain = copy.deepcopy(model).cpu().eval()
    for m in plain.modules():
        if isinstance(m, _QuantMixin):
            m.__class__ = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
    return plain


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; pip install -e '.[export]' (onnx and onnxruntime)") from None


def _weight_input(graph, name: str):
    """The node consuming layer ``name``'s weight initializer, and the initializer."""
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            src = node.input[1]
            while src in alias and src not in inits:
                src = alias[src]
            if src == f"{name}.weight" and src in inits:
                return node, inits[src]
    raise ExportError(f"ONNX export: cannot find layer {name}'s weight in the exported graph")


def export_onnx(model: nn.Module, plan: dict, path: str | Path, *, include_preprocessing: bool = False) -> dict:
    """Write the deployed ``model`` (from ``load_quantized``) as ONNX with Q/DQ around every quantized
    layer's weight and input. The graph's input is the normalized image, batch dimension dynamic; with
    ``include_preprocessing``, raw uint8 pixels, normalized inside the graph as the plan's
    ``preprocessing`` records ((x/255 - mean)/std). The plan's model, data, input shape, quantizer and
    preprocessing travel in the graph's metadata (``hwsearch.plan``).

    Returns ``{"path", "bytes", "float_bytes"}`` (float_bytes: the same graph with float weights).

    Raises:
        ExportError: ``include_preprocessing`` for a run whose inputs a user's own loader prepared.
    """
    import io
    import json
    import warnings

    onnx = _need("onnx")
    from onnx import TensorProto, helper, numpy_helper

    pre = plan.get("preprocessing")
    if include_preprocessing and not pre:
        raise ExportError("--include-preprocessing: the plan records no preprocessing (its inputs came from "
                          "your own loader, which prepares them); export without it")

    layers = quant_layers(model)
    if not all(m.deployed for m in layers.values()):
        raise ExportError("export_onnx: give the model load_quantized returns (its weights stored as integer codes)")
    shape = tuple(plan["input_shape"])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter, constant folding off: batch norm stays apart from the convolutions
        # (folding it in would scale each channel's weights off their 2^b levels) and every weight
        # keeps its module's name.
        torch.onnx.export(_float_copy(model), torch.zeros(shape), buf, dynamo=False, opset_version=OPSET,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    float_bytes = len(buf.getvalue())
    proto = onnx.load_from_string(buf.getvalue())
    graph = proto.graph
    new_nodes: list = []
    for name, m in layers.items():
        node, init = _weight_input(graph, name)
        step = m._deploy_step
        w = numpy_helper.to_array(init)
        codes = _smallest_int(torch.round(torch.from_numpy(w.copy()) / step).to(torch.int32)).numpy()
        int_type = TensorProto.INT8 if codes.dtype.name == "int8" else TensorProto.INT16
        q_name = f"{name}.weight_quantized"
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(codes, q_name),
            helper.make_tensor(f"{name}.weight_scale", TensorProto.FLOAT, [], [step]),
            helper.make_tensor(f"{name}.weight_zero_point", int_type, [], [0]),
        ])
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, f"{name}.weight_scale",
                                                               f"{name}.weight_zero_point"], [init.name],
                                          name=f"{name}/weight_dq"))
        if not m.quantize_input:
            continue
        bits = int(round(float(m.a_beta)))
        alpha = float(m.a_alpha.detach().abs() + 1e-6)
        lo = -alpha if m._signed else 0.0
        x = node.input[0]
        p = f"{name}/input"
        # PACT: ŷ = lo + Δ·round((clip(x, lo, α) - lo)/Δ), Δ = (α - lo)/(2^b - 1): Clip, shift to 0,
        # QuantizeLinear (uint8, zero point 0: codes 0..2^b-1 after the clip), DequantizeLinear, shift back.
        delta = (alpha - lo) / (2**bits - 1)
        graph.initializer.extend([
            helper.make_tensor(f"{p}_lo", TensorProto.FLOAT, [], [lo]),
            helper.make_tensor(f"{p}_clip", TensorProto.FLOAT, [], [alpha]),
            helper.make_tensor(f"{p}_scale", TensorProto.FLOAT, [], [delta]),
            helper.make_tensor(f"{p}_zero_point", TensorProto.UINT8, [], [0]),
        ])
        new_nodes.append(helper.make_node("Clip", [x, f"{p}_lo", f"{p}_clip"], [f"{p}_clipped"], name=f"{p}_clip"))
        src = f"{p}_clipped"
        if m._signed:
            graph.initializer.append(helper.make_tensor(f"{p}_alpha", TensorProto.FLOAT, [], [alpha]))
            new_nodes.append(helper.make_node("Add", [src, f"{p}_alpha"], [f"{p}_shifted"], name=f"{p}_shift"))
            src = f"{p}_shifted"
        new_nodes.append(helper.make_node("QuantizeLinear", [src, f"{p}_scale", f"{p}_zero_point"], [f"{p}_q"],
                                          name=f"{p}_q"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_scale", f"{p}_zero_point"],
                                          [f"{p}_dq"], name=f"{p}_dq"))
        out = f"{p}_dq"
        if m._signed:
            new_nodes.append(helper.make_node("Sub", [out, f"{p}_alpha"], [f"{p}_dq_shifted"], name=f"{p}_unshift"))
            out = f"{p}_dq_shifted"
        node.input[0] = out
    # Nodes must stay in topological order: put the new ones first where they depend only on graph
    # inputs and initializers (weights), otherwise just before their consumer.
    if include_preprocessing:
        new_nodes += _preprocessing_nodes(graph, pre)
    _insert_in_order(graph, new_nodes)
    proto.metadata_props.extend([onnx.StringStringEntryProto(key="hwsearch.plan", value=json.dumps(
        {k: plan.get(k) for k in ("model", "dataset", "input_shape", "quantizer", "preprocessing")}))])
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return {"path": str(path), "bytes": path.stat().st_size, "float_bytes": float_bytes}


def _preprocessing_nodes(graph, pre: dict) -> list:
    """Make the graph take raw uint8 pixels: the input ``input`` becomes uint8, and Cast, Mul(scale),
    Sub(mean), Div(std) (per channel) produce the normalized tensor its first nodes read."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    (inp,) = [i for i in graph.input if i.name == "input"]
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    for node in graph.node:
        node.input[:] = ["input_normalized" if name == "input" else name for name in node.input]
    view = lambda v: np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1)  # noqa: E731
    graph.initializer.extend([numpy_helper.from_array(np.asarray(pre["scale"], np.float32), "input_scale"),
                              numpy_helper.from_array(view(pre["mean"]), "input_mean"),
                              numpy_helper.from_array(view(pre["std"]), "input_std")])
    return [helper.make_node("Cast", ["input"], ["input_float"], to=TensorProto.FLOAT, name="pre/cast"),
            helper.make_node("Mul", ["input_float", "input_scale"], ["input_unit"], name="pre/scale"),
            helper.make_node("Sub", ["input_unit", "input_mean"], ["input_centred"], name="pre/mean"),
            helper.make_node("Div", ["input_centred", "input_std"], ["input_normalized"], name="pre/std")]


def _insert_in_order(graph, new_nodes: list) -> None:
    """Rebuild the node list so that every node comes after the producers of its inputs."""
    nodes = list(graph.node) + new_nodes
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    order, state = [], {}

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, done = stack.pop()
            if done:
                state[j] = 2
                order.append(nodes[j])
                continue
            if state.get(j):
                continue
            state[j] = 1
            stack.append((j, True))
            for inp in nodes[j].input:
                k = produced_by.get(inp)
                if k is not None and not state.get(k):
                    stack.append((k, False))

    for i in range(len(nodes)):
        if not state.get(i):
            visit(i)
    del graph.node[:]
    graph.node.extend(order)


def onnx_top1(path: str | Path, data, *, batch_size: int = 500, raw: bool = False) -> float:
    """Top-1 of the ONNX graph under onnxruntime (CPU) on ``data``'s test split; ``raw``: feed the uint8
    pixels (a graph exported with its preprocessing)."""
    import numpy as np

    ort = _need("onnxruntime")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = count = 0
    batches = (((data.x_test[i:i + batch_size], data.y_test[i:i + batch_size])
                for i in range(0, len(data.y_test), batch_size)) if raw else data.test_batches(batch_size))
    for x, y in batches:
        x = x.cpu().numpy()
        logits = session.run(["logits"], {"input": x if raw else x.astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y.cpu().numpy()).sum())
        count += len(y)
    return correct / count
