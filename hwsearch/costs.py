"""Per-layer cost rows and totals at given bits: the numbers `hwsearch cost` prints and plans store."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cost_models import LayerTable, bits_vector, get_cost_model

__all__ = ["FLOAT_BITS", "cost_report", "float_layers", "quantizable_layers", "uniform_bits"]

FLOAT_BITS = 32


def quantizable_layers(table: LayerTable, model) -> list[str]:
    """The rows of ``table`` that hwsearch quantizes: MACs of an ``nn.Conv2d`` or ``nn.Linear`` module's own
    weight (swapped in place for a quantized subclass). Every other MAC-bearing row stays in float."""
    from torch import nn

    modules = dict(model.named_modules())
    return [layer.name for layer in table.layers
            if layer.has_weight and isinstance(modules.get(layer.name), (nn.Conv2d, nn.Linear))]


def float_layers(table: LayerTable, model) -> list[dict]:
    """The MAC-bearing rows left in float (32 bits, counted in BitOps as such), each with the reason:
    what `hwsearch cost` and `hwsearch run` both list, so that nothing stays in float without a word."""
    quantized = set(quantizable_layers(table, model))
    modules = dict(model.named_modules())
    out = []
    for layer in table.layers:
        if layer.name in quantized:
            continue
        owner, mod = layer.name.removesuffix("@matmul"), modules.get(layer.name)
        if not layer.has_weight:
            reason = f"a matmul of two activations in {owner}.forward (activation products stay float)"
        elif mod is not None and not any(True for _ in mod.children()):
            reason = f"a {layer.op} module (hwsearch quantizes nn.Conv2d and nn.Linear modules)"
        else:
            reason = (f"a functional convolution or linear map in {owner}.forward (hwsearch quantizes "
                      f"nn.Conv2d and nn.Linear modules: make it one to quantize it)")
        out.append({"name": layer.name, "op": layer.op, "macs": layer.macs, "reason": reason})
    return out




def uniform_bits(table: LayerTable, w_bits: int, a_bits: int, *, first_last_bits: int = 8,
                 input_bits: int = 8, quantizable=None) -> tuple[list[int], list[int]]:
    """Uniform bits with the first and last weight layers kept at ``first_last_bits`` when the
    uniform bits are lower (HAWQ's convention; 0 turns that off). The image input to the first
    layer counts as ``input_bits`` whenever activations are quantized (below 32 bits).

    Args:
        quantizable: the names of the rows that are quantized (``quantizable_layers``); the others
            stay at 32 bits, as a run leaves them. Default: every row that has a weight.
    """
    for what, b in (("w_bits", w_bits), ("a_bits", a_bits), ("first_last_bits", first_last_bits or 1),
                    ("input_bits", input_bits)):
        if not 1 <= b <= FLOAT_BITS:
            raise ValueError(f"{what}: must be within 1..{FLOAT_BITS}, got {b}")
    n = len(table)
    w, a = [w_bits] * n, [a_bits] * n
    if quantizable is not None:
        keep = set(quantizable)
        for i, layer in enumerate(table.layers):
            if layer.name not in keep:
                w[i] = a[i] = FLOAT_BITS
    weighted = [i for i, layer in enumerate(table.layers) if layer.has_weight
                and (quantizable is None or layer.name in keep)]
    if weighted:
        ends = {weighted[0], weighted[-1]}
        if first_last_bits:
            for i in ends:
                w[i], a[i] = max(w[i], first_last_bits), max(a[i], first_last_bits)
        if a_bits < FLOAT_BITS:
            a[weighted[0]] = input_bits
    return w, a


def cost_report(table: LayerTable, w_bits: Sequence[float] | Mapping[str, float],
                a_bits: Sequence[float] | Mapping[str, float], *,
                cost_models: Sequence[str] = ("loom", "stripes", "bitfusion")) -> tuple[list[dict], dict]:
    """Rows (one per layer: name, op, MACs, params, bits, BitOps, bytes, accelerator cycles) and totals."""
    w = bits_vector(table, w_bits, what="w_bits")
    a = bits_vector(table, a_bits, what="a_bits")
    bitops = get_cost_model("bitops").per_layer(table, w, a)
    mem = get_cost_model("memory").per_layer(table, w, a)
    extra = {name: get_cost_model(name).per_layer(table, w, a) for name in cost_models}
    rows = []
    for i, layer in enumerate(table.layers):
        row = {"name": layer.name, "op": layer.op, "macs": layer.macs, "params": layer.params,
               "weight_bits": int(w[i]) if layer.has_weight else None, "act_bits": int(a[i]),
               "bitops": bitops[i], "weight_bytes": mem[i]}
        row.update({f"{name}_cycles": values[i] for name, values in extra.items()})
        rows.append(row)
    params = table.params
    fp32 = get_cost_model("bitops")(table, FLOAT_BITS, FLOAT_BITS)
    totals = {
        "macs": table.macs,
        "bitops": math.fsum(bitops),
        "bitops_fp32": fp32,
        "weight_bytes": math.fsum(mem),
        "other_bytes": table.other_params * 4,
        "params": params,
        "other_params": table.other_params,
        "avg_weight_bits": (math.fsum(mem) * 8 / params) if params else 0.0,
    }
    totals.update({f"{name}_cycles": math.fsum(values) for name, values in extra.items()})
    return rows, totals
