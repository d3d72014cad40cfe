"""The trained quantized model as a checkpoint, and a plan applied to a model.

``apply_plan`` quantizes a model in place at a plan's bits. ``save_quantized`` writes ``model.pt``:
for every quantized layer its integer weight levels packed in 2, 4 or 8 bits (so the file shrinks
with the bits), the step and offset that turn them into weights, its input clip, sign and bits;
float tensors for everything else; and the plan, which identifies the model, data, input shape and
input preprocessing. ``load_quantized`` rebuilds the model from it with
``torch.load(weights_only=True)``: its outputs are the trained model's.

``hwsearch.run`` (training) and ``hwsearch.export`` (ONNX) both use this module; it uses neither.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cost_models import profile

from .costs import FLOAT_BITS
from .files import atomic_path
from .plan import PlanError, check_plan_matches
from .quant import quant_layers, quantize_model

__all__ = ["ExportError", "apply_plan", "load_quantized", "pack_levels", "quantized_state", "save_quantized",
           "unpack_levels"]


class ExportError(ValueError):
    """A run directory without a trained model, a damaged checkpoint, a model that does not fit its plan,
    or a graph that cannot be exported."""


def apply_plan(model: nn.Module, plan: dict, *, quantizer: str | None = None, first_layer: str | None = None,
               check: bool = True) -> dict:
    """Quantize ``model`` in place at the plan's bits (frozen). Returns the quantized modules by name.

    Args:
        check: validate the plan against the model's layer table first (``False`` for a plan made from
            that very table, which needs only ``layers`` and ``quantizer``).

    Raises:
        PlanError: when the plan does not fit the model.
    """
    if check:
        check_plan_matches(plan, profile(model, tuple(plan["input_shape"])))
    modules = dict(model.named_modules())
    names = [layer["name"] for layer in plan["layers"]
             if isinstance(modules.get(layer["name"]), (nn.Conv2d, nn.Linear))
             and layer["weight_bits"] is not None and layer["weight_bits"] < FLOAT_BITS]
    by_name = {layer["name"]: layer for layer in plan["layers"]}
    quantize_model(model, names, quantizer=quantizer or plan["quantizer"]["weights"],
                   w_bits={n: by_name[n]["weight_bits"] for n in names},
                   a_bits={n: by_name[n]["act_bits"] for n in names},
                   first_layer=first_layer if first_layer is not None else (names[0] if names else None))
    layers = quant_layers(model)
    for m in layers.values():
        m.w_beta.requires_grad_(False)
        m.a_beta.requires_grad_(False)
    return layers


FORMAT = "hwsearch.quantized/v1"


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


@torch.no_grad()
def quantized_state(model: nn.Module, plan: dict, *, num_classes: int | None) -> dict:
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


def save_quantized(model: nn.Module, plan: dict, path: str | Path, *, num_classes: int | None) -> Path:
    """Write ``model.pt`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    state = quantized_state(model, plan, num_classes=num_classes)  # every check first, then the file
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _checkpoint_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ExportError(f"{p}: no such run directory")
    if not (p / "model.pt").is_file():
        hint = (f"; a search keeps each trial's model in {p}/trials/NNNN/model.pt (and the baselines' in "
                f"{p}/baselines/wBaB/model.pt): export one of those" if (p / "trials").is_dir() else "")
        raise ExportError(f"{p} holds no trained model (model.pt); `hwsearch run --out DIR` or "
                          f"`hwsearch apply PLAN --out DIR` writes one{hint}")
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


def load_quantized(run_dir: str | Path, *, model: nn.Module | str | None = None, device: str | torch.device = "cpu",
                   with_plan: bool = False):
    """Rebuild the trained quantized model from ``RUN_DIR/model.pt`` (or that file), in eval mode;
    with ``with_plan``, return ``(model, plan)`` (the plan stored with it), reading the file once.

    Args:
        model: the float skeleton to rebuild into (changed in place: its layers are quantized and its
            tensors replaced), or a name/``module:factory`` that builds it. Default: the plan's ``model``,
            built by name (which a model passed as an object to ``hwsearch.quantize`` may not have).

    Raises:
        ExportError: no checkpoint, a damaged one, or a model whose layers do not fit its plan.
    """
    from .models import create_model

    path = _checkpoint_path(run_dir)
    blob = _read(path)
    plan, layers, floats = blob["plan"], blob["layers"], blob["float_state"]
    shape = tuple(plan["input_shape"])
    try:
        if model is None or isinstance(model, str):
            try:
                model = create_model(model or plan["model"], num_classes=blob["num_classes"] or 10,
                                     in_channels=shape[1])
            except (KeyError, ValueError) as exc:
                raise ExportError(f"{path}: cannot build model {model or plan['model']!r} "
                                  f"({exc.args[0] if exc.args else exc}); pass the model (Python: "
                                  f"load_quantized(RUN_DIR, model=MyNet()); CLI: --model package.module:factory)") from None
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


