"""Hardware cost models: pure functions of a layer table and per-layer bitwidths.

Every model has a float evaluation for integer bits (``model(table, w_bits, a_bits)``)
and a torch evaluation that is differentiable in continuous bits
(``model.torch(table, w_bits, a_bits)``); the two agree exactly at integer bits.
Costs that are not polynomial in the bits (ceil in bit-fusion, table lookups) are
made continuous by linear interpolation between neighbouring integers, which is exact
at the integers and has a well-defined gradient in between.
"""

from __future__ import annotations

import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .profile import LayerTable
from .registry import Registry

__all__ = [
    "BitFusion",
    "BitOps",
    "BitSerial",
    "CostModel",
    "LookupTable",
    "WeightMemory",
    "bits_vector",
    "cost_models",
    "get_cost_model",
]

FLOAT_BITS = 32
BitsLike = int | float | Sequence[float] | Mapping[str, float] | torch.Tensor


def bits_vector(table: LayerTable, bits: BitsLike, *, what: str = "bits") -> torch.Tensor:
    """Bits aligned with ``table.layers`` as a float64 tensor, from a scalar, sequence or name map.

    Raises:
        ValueError: a wrong length, a missing or unknown layer name, or bits outside 1..32.
    """
    if isinstance(bits, torch.Tensor):
        vec = bits.detach().to(torch.float64).reshape(-1)
        if vec.numel() == 1:
            vec = vec.expand(len(table)).clone()
    elif isinstance(bits, Mapping):
        unknown = set(bits) - set(table.names)
        if unknown:
            raise ValueError(f"{what}: unknown layers {sorted(unknown)}")
        missing = [n for n in table.names if n not in bits]
        if missing:
            raise ValueError(f"{what}: missing layers {missing}")
        vec = torch.tensor([float(bits[n]) for n in table.names], dtype=torch.float64)
    elif isinstance(bits, (int, float)):
        vec = torch.full((len(table),), float(bits), dtype=torch.float64)
    else:
        vec = torch.tensor([float(b) for b in bits], dtype=torch.float64)
    if vec.numel() != len(table):
        raise ValueError(f"{what}: expected {len(table)} values, one per layer, got {vec.numel()}")
    if bool(((vec < 1) | (vec > FLOAT_BITS)).any()):
        raise ValueError(f"{what}: bits must be within 1..{FLOAT_BITS}, got {vec.tolist()}")
    return vec


def interp_int(fn, bits: torch.Tensor) -> torch.Tensor:
    """Continuous extension of an integer function: exact at integers, linear between them."""
    lo = torch.floor(bits.detach())
    frac = bits - lo
    f_lo, f_hi = fn(lo), fn(lo + 1)
    return f_lo + frac * (f_hi - f_lo)


class CostModel(ABC):
    """A named hardware cost of a network at given per-layer bits.

    Subclasses implement ``layer_costs`` once, in torch; the float evaluation runs it in
    float64 on integer bits, so both forms share one formula.
    """

    name: str = ""
    unit: str = ""

    @abstractmethod
    def layer_costs(self, table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor) -> torch.Tensor:
        """Per-layer cost, a tensor of ``len(table)``, differentiable in the bits. Bits of shape
        ``(..., len(table))`` (a batch of plans) give costs of that shape."""

    def check(self, table: LayerTable) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` when this model cannot price ``table`` (e.g. a LUT missing layers)."""

    @staticmethod
    def _weight_or_act(table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor) -> torch.Tensor:
        # A matmul of two activations has no weight: both operands use activation bits.
        return torch.where(table.column("has_weight", a_bits), w_bits, a_bits)

    def torch(self, table: LayerTable, w_bits: torch.Tensor, a_bits: torch.Tensor) -> torch.Tensor:
        """Total cost as a 0-d tensor, differentiable in continuous ``w_bits`` and ``a_bits``."""
        return self.layer_costs(table, w_bits, a_bits).sum()

    def per_layer(self, table: LayerTable, w_bits: BitsLike, a_bits: BitsLike) -> list[float]:
        """Per-layer cost at integer (or float) bits, as Python floats."""
        w = bits_vector(table, w_bits, what="w_bits")
        a = bits_vector(table, a_bits, what="a_bits")
        return self.layer_costs(table, w, a).tolist()

    def __call__(self, table: LayerTable, w_bits: BitsLike, a_bits: BitsLike) -> float:
        return math.fsum(self.per_layer(table, w_bits, a_bits))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _column(table: LayerTable, attr: str, like: torch.Tensor) -> torch.Tensor:
    return table.column(attr, like)


class BitOps(CostModel):
    """BitOps = sum_l MACs_l * b_w,l * b_a,l (DESIGN.md)."""

    name, unit = "bitops", "BitOps"

    def layer_costs(self, table, w_bits, a_bits):
        return _column(table, "macs", a_bits) * self._weight_or_act(table, w_bits, a_bits) * a_bits


class WeightMemory(CostModel):
    """Bytes of the quantized weights: sum_l params_l * b_w,l / 8 (other parameters are reported apart)."""

    name, unit = "memory", "bytes"

    def layer_costs(self, table, w_bits, a_bits):
        return _column(table, "params", w_bits) * w_bits / 8


class BitSerial(CostModel):
    """Cycles of a bit-serial engine with ``lanes`` MAC lanes.

    ``mode="loom"`` serializes both operands (cycles ~ MACs * b_w * b_a, Sharify et al., Loom);
    ``mode="stripes"`` serializes activations only (cycles ~ MACs * b_a, Judd et al., Stripes).
    """

    unit = "cycles"

    def __init__(self, mode: str = "loom", lanes: int = 4096) -> None:
        if mode not in ("loom", "stripes"):
            raise ValueError(f"mode: expected 'loom' or 'stripes', got {mode!r}")
        if lanes <= 0:
            raise ValueError(f"lanes: must be positive, got {lanes}")
        self.mode, self.lanes, self.name = mode, lanes, mode

    def layer_costs(self, table, w_bits, a_bits):
        macs = _column(table, "macs", a_bits)
        if self.mode == "stripes":
            return macs * a_bits / self.lanes
        return macs * self._weight_or_act(table, w_bits, a_bits) * a_bits / self.lanes


class BitFusion(CostModel):
    """Cycles of a bit-fusion engine of 2-bit bricks: MACs * ceil(b_w/2) * ceil(b_a/2) / bricks (Sharma et al.)."""

    name, unit = "bitfusion", "cycles"

    def __init__(self, bricks: int = 4096) -> None:
        if bricks <= 0:
            raise ValueError(f"bricks: must be positive, got {bricks}")
        self.bricks = bricks

    def layer_costs(self, table, w_bits, a_bits):
        def bricks(b):
            return interp_int(lambda k: torch.ceil(k / 2), b)
        w = self._weight_or_act(table, w_bits, a_bits)
        return _column(table, "macs", a_bits) * bricks(w) * bricks(a_bits) / self.bricks


class LookupTable(CostModel):
    """Measured per-layer latency read from a CSV with columns ``layer,w_bits,a_bits,latency_ms``.

    Continuous bits interpolate bilinearly between the measured integer points.
    """

    unit = "ms"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"lut:{self.path}"
        if not self.path.is_file():
            raise ValueError(f"lut: no such file {str(self.path)!r}")
        self.entries: dict[str, dict[tuple[int, int], float]] = {}
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"layer", "w_bits", "a_bits", "latency_ms"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise ValueError(f"lut {self.path}: expected columns {sorted(need)}, got {reader.fieldnames}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    key = (int(row["w_bits"]), int(row["a_bits"]))
                    value = float(row["latency_ms"])
                except (TypeError, ValueError):
                    raise ValueError(f"lut {self.path}, line {lineno}: w_bits, a_bits must be integers "
                                     f"and latency_ms a number") from None
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"lut {self.path}, line {lineno}: latency_ms must be finite and >= 0")
                self.entries.setdefault(row["layer"], {})[key] = value

    def check(self, table: LayerTable) -> None:
        missing = [n for n in table.names if n not in self.entries]
        if missing:
            raise ValueError(f"lut {self.path}: no measurements for layers {missing}")

    def _grids(self, table: LayerTable, like: torch.Tensor) -> torch.Tensor:
        """``[layers, 34, 34]`` latencies indexed by (w_bits, a_bits), NaN where unmeasured; built once per table."""
        cache = self.__dict__.setdefault("_grid_cache", {})
        key = (tuple(table.names), like.device, like.dtype)
        if key not in cache:
            grid = torch.full((len(table), FLOAT_BITS + 2, FLOAT_BITS + 2), float("nan"), dtype=torch.float64)
            for i, name in enumerate(table.names):
                for (w, a), v in self.entries[name].items():
                    if 1 <= w <= FLOAT_BITS and 1 <= a <= FLOAT_BITS:
                        grid[i, w, a] = v
            cache[key] = grid.to(device=like.device, dtype=like.dtype)
        return cache[key]

    def layer_costs(self, table, w_bits, a_bits):
        self.check(table)
        w_bits = self._weight_or_act(table, w_bits, a_bits)
        grid = self._grids(table, a_bits)
        rows = torch.arange(len(table), device=a_bits.device)
        w0, a0 = torch.floor(w_bits.detach()).long(), torch.floor(a_bits.detach()).long()
        fw, fa = w_bits - w0, a_bits - a0
        total = torch.zeros(torch.broadcast_shapes(w_bits.shape, a_bits.shape), dtype=a_bits.dtype,
                            device=a_bits.device)
        missing = torch.zeros(total.shape, dtype=torch.bool, device=a_bits.device)
        for dw, weight_w in ((0, 1 - fw), (1, fw)):
            for da, weight_a in ((0, 1 - fa), (1, fa)):
                weight = weight_w * weight_a
                value = grid[rows, (w0 + dw).clamp(max=FLOAT_BITS + 1), (a0 + da).clamp(max=FLOAT_BITS + 1)]
                used = weight.detach() != 0
                missing |= used & torch.isnan(value)
                total = total + torch.where(used, weight * torch.nan_to_num(value), torch.zeros_like(total))
        if bool(missing.any()):  # one host sync per evaluation
            n = len(table)
            row, i = (int(v) for v in missing.reshape(-1, n).nonzero()[0])
            wv, av = (b.reshape(-1, n)[row, i] for b in torch.broadcast_tensors(w_bits, a_bits))
            raise ValueError(f"lut {self.path}: layer {table.names[i]!r} has no measurement around "
                             f"w_bits={float(wv):g}, a_bits={float(av):g}")
        return total


cost_models: Registry[CostModel] = Registry("cost model")
for _model in (BitOps(), WeightMemory(), BitSerial("loom"), BitSerial("stripes"), BitFusion()):
    cost_models.register(_model.name, _model)


def get_cost_model(spec: str | CostModel) -> CostModel:
    """A cost model by name (``bitops``, ``memory``, ``loom``, ``stripes``, ``bitfusion``, ``lut:PATH``)
    or the instance itself."""
    if isinstance(spec, CostModel):
        return spec
    if spec.startswith("lut:"):
        return LookupTable(spec[4:])
    return cost_models.get(spec)
