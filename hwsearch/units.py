"""Parsing of quantities in the units cost models count in (``0.5G`` BitOps, ``40KiB`` of memory) and of shapes."""

from __future__ import annotations

import math
import re

__all__ = ["ACCEPTED", "format_si", "parse_quantity", "parse_shape", "slug"]

_SI = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"KI": 2.0**10, "MI": 2.0**20, "GI": 2.0**30, "TI": 2.0**40}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
# Case matters where it carries meaning: M (mega) is not m (milli), B (bytes) is not b (bits).
_PLAIN = re.compile(rf"^\s*{_NUMBER}\s*([kKMGTP]?)\s*$")
_BYTES = re.compile(rf"^\s*{_NUMBER}\s*([kKMGTP]?i?)([Bb])\s*$")

ACCEPTED = {
    "count": "a plain number with an optional SI multiplier: 12, 1e9, 300K, 300M, 0.5G, 2T",
    "bytes": "a number of bytes: 40000, 40KB, 1.5MB, 2GB (powers of 1000), 40KiB, 1MiB, 2GiB (powers of 1024); "
             "bits as b, Kb, Mb, ... are converted to bytes",
}


def parse_quantity(text: str | float | int, *, what: str = "value", unit: str = "count") -> float:
    """A positive finite quantity in the unit a cost model counts in.

    ``unit="count"`` (BitOps, cycles, milliseconds): a number with an optional SI multiplier,
    ``"0.5G"`` -> 5e8, ``"300M"`` -> 3e8, ``"1e9"`` -> 1e9; a unit such as ``B`` is refused.
    ``unit="bytes"`` (weight memory): ``"40KB"`` -> 40,000, ``"40KiB"`` -> 40,960, ``"1MB"`` -> 1e6,
    ``"1MiB"`` -> 1,048,576, ``"8Kb"`` (bits) -> 1,000 bytes; a bare number is bytes.

    Raises:
        ValueError: naming ``what`` and the accepted forms, for text that does not parse in that unit
        or a value that is not > 0.
    """
    if unit not in ACCEPTED:
        raise ValueError(f"unit: expected one of {sorted(ACCEPTED)}, got {unit!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _parse(str(text), unit)
        if value is None:
            raise ValueError(f"{what}: cannot read {text!r}; expected {ACCEPTED[unit]}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be a positive number, got {text!r}")
    return value


def _parse(text: str, unit: str) -> float | None:
    m = _PLAIN.match(text)
    if m:
        return float(m.group(1)) * _SI[m.group(2).upper()]
    if unit != "bytes":
        return None
    m = _BYTES.match(text)
    if not m:
        return None
    prefix, symbol = m.group(2), m.group(3)
    if prefix.endswith("i"):
        if prefix[:-1].upper() + "I" not in _BINARY:
            return None
        scale = _BINARY[prefix[:-1].upper() + "I"]
    else:
        scale = _SI[prefix.upper()]
    value = float(m.group(1)) * scale
    return value / 8.0 if symbol == "b" else value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; every entry a positive integer."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"input shape: expected comma-separated positive integers like 1,3,32,32, got {text!r}")
    return shape


def format_si(value: float, unit: str = "") -> str:
    """1.5e9 -> '1.50G'."""
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def slug(text: str, limit: int = 80) -> str:
    """A file-name-safe version of ``text`` (model and dataset names, study names)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:limit]
