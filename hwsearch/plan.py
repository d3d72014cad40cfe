"""The plan file ``hwsearch.plan/v1``: per-layer bits and costs, written atomically, validated when read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cost_models import LayerTable

from .costs import cost_report
from .files import atomic_path, write_json

__all__ = ["PlanError", "SCHEMA", "build_plan", "check_plan_matches", "check_plan_totals", "load_plan", "save_plan"]

SCHEMA = "hwsearch.plan/v1"


class PlanError(ValueError):
    """A plan file that is malformed or does not fit the model; the message names the field."""


_JSON_SCHEMA = {
    "type": "object",
    "required": ["schema", "model", "dataset", "input_shape", "quantizer", "cost_model", "budget", "layers",
                 "totals", "metrics", "provenance"],
    "properties": {
        "schema": {"const": SCHEMA},
        "model": {"type": "string"},
        "dataset": {"type": "string"},
        "input_shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2},
        "quantizer": {"type": "object", "required": ["weights", "activations"]},
        "cost_model": {"type": "string"},
        "budget": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
        "layers": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "op", "macs", "params", "weight_bits", "act_bits", "bitops", "weight_bytes"],
            "properties": {
                "name": {"type": "string"}, "op": {"type": "string"},
                "macs": {"type": "integer", "minimum": 0}, "params": {"type": "integer", "minimum": 0},
                "weight_bits": {"type": ["integer", "null"], "minimum": 1, "maximum": 32},
                "act_bits": {"type": "integer", "minimum": 1, "maximum": 32},
                "bitops": {"type": "number", "minimum": 0}, "weight_bytes": {"type": "number", "minimum": 0},
            }}},
        "totals": {"type": "object", "required": ["macs", "bitops", "bitops_fp32", "weight_bytes", "avg_weight_bits"]},
        "metrics": {"type": "object"},
        "provenance": {"type": "object"},
    },
}


def build_plan(*, model: str, dataset: str, table: LayerTable, w_bits: list[int], a_bits: list[int],
               quantizer: str, cost_model: str, budget: Mapping[str, float], metrics: Mapping[str, Any],
               seed: int, hyperparameters: Mapping[str, Any], preprocessing: Mapping[str, Any] | None = None,
               weights: Mapping[str, Any] | None = None, float_layers: list | None = None) -> dict:
    """A plan dict (schema v1) for integer bits on ``table``.

    Args:
        preprocessing: how a raw image becomes the model's input (``TensorData.preprocessing``); None when
            the user's own loader prepares inputs.
        weights: the FP32 start when it was given rather than trained (a file's path and sha256, or a
            model object), recorded in the provenance so that ``apply`` starts from the same weights.
        float_layers: MAC-bearing rows left in float and why (``costs.float_layers``).
    """
    import torch

    from . import __version__

    rows, totals = cost_report(table, w_bits, a_bits, cost_models=())
    layers = [{k: r[k] for k in ("name", "op", "macs", "params", "weight_bits", "act_bits", "bitops", "weight_bytes")}
              for r in rows]
    return {
        "schema": SCHEMA, "model": model, "dataset": dataset, "input_shape": list(table.input_shape),
        "quantizer": {"weights": quantizer, "activations": "pact"},
        "cost_model": cost_model, "budget": dict(budget), "layers": layers,
        "totals": {k: totals[k] for k in ("macs", "bitops", "bitops_fp32", "weight_bytes", "other_bytes",
                                          "avg_weight_bits")},
        "metrics": dict(metrics),
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
        "float_layers": list(float_layers or []),
        "provenance": {"hwsearch": __version__, "torch": str(torch.__version__), "seed": seed,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "hyperparameters": dict(hyperparameters),
                       **({"weights": dict(weights)} if weights is not None else {})},
    }


def save_plan(plan: dict, path: str | Path) -> Path:
    """Write ``plan`` as JSON and its layers as CSV beside it, each atomically (temp file + rename)."""
    import pandas as pd

    path = Path(path)
    write_json(path, plan)
    with atomic_path(path.with_suffix(".csv")) as tmp:
        pd.DataFrame(plan["layers"]).to_csv(tmp, index=False)
    return path


def _field(error) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top level)"


def load_plan(path: str | Path, *, check_totals: bool = True) -> dict:
    """Read and validate a plan file (schema, types, ranges, totals consistent with the layers).

    Args:
        check_totals: also check the totals against the layers (``check_plan_totals``). A caller that
            has the model checks its layers first (``check_plan_matches``), so that a plan missing a
            layer is reported as that, not as a totals mismatch.

    Raises:
        PlanError: naming the file and the field that is wrong.
    """
    import jsonschema

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan: no such file {str(path)!r}")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan {path}: not valid JSON ({exc})") from None
    errors = sorted(jsonschema.Draft202012Validator(_JSON_SCHEMA).iter_errors(plan), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise PlanError(f"plan {path}: field {_field(e)}: {e.message}")
    names = [layer["name"] for layer in plan["layers"]]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise PlanError(f"plan {path}: field layers: duplicate layer names {sorted(dupes)}")
    for i, layer in enumerate(plan["layers"]):
        w = layer["weight_bits"] if layer["weight_bits"] is not None else layer["act_bits"]
        expected = layer["macs"] * w * layer["act_bits"]
        if not math.isclose(layer["bitops"], expected, rel_tol=1e-9, abs_tol=1e-6):
            raise PlanError(f"plan {path}: field layers/{i}/bitops: {layer['bitops']} != macs*weight_bits*act_bits "
                            f"= {expected}")
    if check_totals:
        check_plan_totals(plan, path)
    return plan


def check_plan_totals(plan: dict, path: str | Path = "") -> None:
    """Raise ``PlanError`` when the plan's totals are not the sums over its layers."""
    for key in ("macs", "bitops", "weight_bytes"):
        total = math.fsum(layer[key] for layer in plan["layers"])
        if not math.isclose(plan["totals"][key], total, rel_tol=1e-9, abs_tol=1e-6):
            raise PlanError(f"plan {path}: field totals/{key}: {plan['totals'][key]} != sum over layers {total}")


def check_plan_matches(plan: dict, table: LayerTable, path: str | Path = "") -> None:
    """Check that a plan fits a model's layer table: every layer present, no extras, same MACs.

    Raises:
        PlanError: naming the file and the missing, extra or mismatched layers.
    """
    where = f"plan {path}: field" if path else "plan field"
    plan_names = [layer["name"] for layer in plan["layers"]]
    missing = [n for n in table.names if n not in plan_names]
    extra = [n for n in plan_names if n not in table.names]
    if missing:
        raise PlanError(f"{where} layers: missing layers of model {plan['model']!r}: {', '.join(missing)}")
    if extra:
        raise PlanError(f"{where} layers: layers not in model {plan['model']!r}: {', '.join(extra)}")
    if list(plan["input_shape"]) != list(table.input_shape):
        raise PlanError(f"{where} input_shape: {plan['input_shape']} but the data gives {list(table.input_shape)}")
    by_name = {layer["name"]: layer for layer in plan["layers"]}
    for layer in table.layers:
        if by_name[layer.name]["macs"] != layer.macs:
            raise PlanError(f"{where} layers/{layer.name}/macs: {by_name[layer.name]['macs']} but the model "
                            f"has {layer.macs}")
