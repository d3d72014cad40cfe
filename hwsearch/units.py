"""Parsing of numbers with SI suffixes (``0.5G``, ``300M``, ``40KB``) and shapes."""

from __future__ import annotations

import math
import re

__all__ = ["format_si", "parse_quantity", "parse_shape", "slug"]

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTP]?)(?:I?B|BOPS?|OPS?)?\s*$", re.IGNORECASE)


def parse_quantity(text: str | float | int, *, what: str = "value") -> float:
    """A positive finite number, optionally with an SI suffix and a unit (B, BOPs).

    ``"0.5G"`` -> 5e8, ``"300M"`` -> 3e8, ``"40KB"`` -> 4e4, ``"1e9"`` -> 1e9.

    Raises:
        ValueError: naming ``what``, for text that does not parse or a value that is not > 0.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _PATTERN.match(str(text))
        if not m:
            raise ValueError(f"{what}: cannot parse {text!r}; expected a positive number with an optional "
                             f"SI suffix such as 0.5G, 300M or 40KB")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be a positive number, got {text!r}")
    return value


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
