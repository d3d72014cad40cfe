"""The trained quantized model as output: a checkpoint with integer weights, and ONNX with Q/DQ nodes.

``save_quantized`` writes ``model.pt``: for every quantized layer its integer weight levels packed
in 2, 4 or 8 bits (so the file shrinks with the bits), the step and offset that turn them into
weights, its input clip, sign and bits; float tensors for everything else; and the plan, which
identifies the model, data and input shape. ``load_quantized`` rebuilds the model from it with
``torch.load(weights_only=True)``: its outputs are the trained model's.

``export_onnx`` writes an ONNX graph (opset 21) in which every quantized layer's weight is an
integer initializer behind a DequantizeLinear, and its input passes Clip → QuantizeLinear →
DequantizeLinear at the layer's clip and bits; other layers stay float. Runtimes compute such a
graph in int8 containers (or in float after dequantizing): the plan's accuracy is kept, and speed at
b < 8 bits needs low-bit kernels that the runtime may not have.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .quant import _QuantMixin, quant_layers

__all__ = ["ExportError", "export_onnx", "load_quantized", "onnx_top1", "pack_levels",
           "save_quantized", "unpack_levels"]

FORMAT = "hwsearch.quantized/v1"
OPSET = 21  # DequantizeLinear on int16 (8-bit DoReFa codes) needs opset 21


class ExportError(ValueError):
    """A run directory without a trained model, a damaged checkpoint, or a model that does not fit its plan."""


def pack_levels(levels: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Level indices in [0, 2^bits) packed little-end first into uint8: 4 per byte at <= 2 bits, 2 per
    byte at 3-4 bits, 1 per byte otherwise. Returns (packed bytes, bits per index)."""
    width = 2 if bits <= 2 else 4 if bits <= 4 else 8
    per = 8 // width
    flat = levels.flatten().to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % per)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * width
    return (flat << shifts).sum(1).to(torch.uint8), width


def unpack_levels(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The inverse of ``pack_levels``: ``count`` level indices as int32."""
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.int32) * width
    return ((packed.to(torch.int32)[:, None] >> shifts) & ((1 << width) - 1)).flatten()[:count]


def _smallest_int(codes: torch.Tensor) -> torch.Tensor:
    low, high = int(codes.min()), int(codes.max())
    dtype = torch.int8 if low >= -128 and high <= 127 else torch.int16
    return codes.to(dtype)


@torch.no_grad()
def quantized_state(model: nn.Module, plan: dict, *, num_classes: int) -> dict:
    """The checkpoint's contents (tensors, numbers, strings: loadable with ``weights_only=True``)."""
    layers = {}
    skip = set()
    for name, m in quant_layers(model).items():
        wb, ab = int(round(float(m.w_beta))), int(round(float(m.a_beta)))
        if m.deployed:  # already codes × step (a loaded checkpoint saved again)
            step = m._deploy_step
            codes = torch.round(m.weight / step).to(torch.int32)
        else:
            codes, step = m.quantizer.codes(m.weight, wb, m.w_scale.abs() + 1e-8)
        # Codes are step multiples offset + stride·k with k in [0, 2^b): DoReFa's are the odd numbers in
        # ±(2^b - 1) (stride 2), WRPN's the integers in ±(2^(b-1) - 1). k is stored packed in b <= 2, 4 or
        # 8 bits, so the checkpoint shrinks with the bits.
        codes = codes.cpu()
        stride = 2 if m.quantizer.name == "dorefa" else 1
        offset = -(2**wb - 1) if stride == 2 else -(2 ** (wb - 1) - 1)
        k = (codes - offset) // stride
        if int(k.min()) < 0 or int(k.max()) >= 2**wb or not torch.equal(offset + stride * k, codes):
            raise ExportError(f"layer {name}: weights are not on the {wb}-bit grid")
        packed, width = pack_levels(k, wb)
        layers[name] = {"weight_bits": wb, "act_bits": ab, "levels": packed, "level_width": width,
                        "offset": offset, "stride": stride, "shape": list(codes.shape),
                        "step": float(step), "input_clip": float(m.a_alpha.detach().abs() + 1e-6),
                        "input_signed": bool(m._signed), "quantize_input": bool(m.quantize_input),
                        "quantizer": m.quantizer.name}
        skip.add(f"{name}.weight")
    floats = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in skip}
    return {"format": FORMAT, "plan": plan, "num_classes": num_classes, "layers": layers, "float_state": floats}


def save_quantized(model: nn.Module, plan: dict, path: str | Path, *, num_classes: int) -> Path:
    """Write ``model.pt`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(quantized_state(model, plan, num_classes=num_classes), tmp)
    os.replace(tmp, path)
    return path


def _checkpoint_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ExportError(f"{p}: no such run directory")
    if not (p / "model.pt").is_file():
        raise ExportError(f"{p} holds no trained model (model.pt); `hwsearch run --out DIR` or "
                          "`hwsearch apply PLAN --out DIR` writes one")
    return p / "model.pt"


def _read(path: Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint")
        for key in ("plan", "layers", "float_state", "num_classes"):
            blob[key]  # noqa: B018 - KeyError names a missing part
        return blob
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is damaged or not a hwsearch checkpoint: {text}") from None


def load_quantized(run_dir: str | Path, *, device: str | torch.device = "cpu", with_plan: bool = False):
    """Rebuild the trained quantized model from ``RUN_DIR/model.pt`` (or that file), in eval mode;
    with ``with_plan``, return ``(model, plan)`` (the plan stored with it), reading the file once.

    Raises:
        ExportError: no checkpoint, a damaged one, or a model whose layers do not fit its plan.
    """
    from .models import create_model
    from .plan import PlanError, check_plan_matches
    from .run import apply_plan

    path = _checkpoint_path(run_dir)
    blob = _read(path)
    plan, layers, floats = blob["plan"], blob["layers"], blob["float_state"]
    shape = tuple(plan["input_shape"])
    try:
        model = create_model(plan["model"], num_classes=blob["num_classes"], in_channels=shape[1])
        from cost_models import profile

        check_plan_matches(plan, profile(model, shape), path)
    except PlanError as exc:
        raise ExportError(str(exc)) from None
    names = set(layers)
    planned = {layer["name"] for layer in plan["layers"] if layer["weight_bits"] is not None
               and layer["weight_bits"] < 32 and isinstance(model.get_submodule(layer["name"]), (nn.Conv2d, nn.Linear))}
    if names != planned:
        raise ExportError(f"{path}: quantized layers {sorted(names ^ planned)} do not match the plan")
    apply_plan(model, plan, quantizer=plan["quantizer"]["weights"], check=False)
    quantized = quant_layers(model)
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected or set(missing) != {f"{n}.weight" for n in quantized}:
        raise ExportError(f"{path}: the checkpoint's tensors do not fit model {plan['model']!r} "
                          f"(missing {sorted(set(missing) - {f'{n}.weight' for n in quantized})[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for name, m in quantized.items():
            entry = layers[name]
            if tuple(entry["shape"]) != tuple(m.weight.shape):
                raise ExportError(f"{path}: layer {name}: weights of shape {tuple(entry['shape'])}, the model's "
                                  f"is {tuple(m.weight.shape)}")
            k = unpack_levels(entry["levels"], entry["level_width"], m.weight.numel())
            codes = (entry["offset"] + entry["stride"] * k).view(m.weight.shape)
            m.weight.copy_(codes.to(m.weight.dtype) * entry["step"])
            m._deploy_step = entry["step"]
            m.deployed = True
            m._signed = bool(entry["input_signed"])
            m._calibrated = True
    model = model.to(device).eval()
    return (model, plan) if with_plan else model


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


def export_onnx(model: nn.Module, plan: dict, path: str | Path) -> dict:
    """Write the deployed ``model`` (from ``load_quantized``) as ONNX with Q/DQ around every quantized
    layer's weight and input. The graph's input is the normalized image, batch dimension dynamic.

    Returns ``{"path", "bytes", "float_bytes"}`` (float_bytes: the same graph with float weights).
    """
    import io
    import json
    import warnings

    onnx = _need("onnx")
    from onnx import TensorProto, helper, numpy_helper

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
    _insert_in_order(graph, new_nodes)
    proto.metadata_props.extend([onnx.StringStringEntryProto(key="hwsearch.plan", value=json.dumps(
        {k: plan[k] for k in ("model", "dataset", "input_shape", "quantizer")}))])
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size, "float_bytes": float_bytes}


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


def onnx_top1(path: str | Path, data, *, batch_size: int = 500) -> float:
    """Top-1 of the ONNX graph under onnxruntime (CPU) on ``data``'s test split."""
    import numpy as np

    ort = _need("onnxruntime")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for x, y in data.test_batches(batch_size):
        logits = session.run(["logits"], {"input": x.cpu().numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y.cpu().numpy()).sum())
    return correct / len(data.y_test)
