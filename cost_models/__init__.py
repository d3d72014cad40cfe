"""Hardware cost models for hwsearch: a per-layer MAC table (fvcore) and named cost models.

This package knows nothing of training; ``hwsearch`` imports it, never the reverse.
"""

from .models import (
    BitFusion,
    BitOps,
    BitSerial,
    CostModel,
    LookupTable,
    WeightMemory,
    bits_vector,
    cost_models,
    get_cost_model,
)
from .profile import Layer, LayerTable, UncountedOpsError, profile
from .registry import Registry

__all__ = [
    "BitFusion",
    "BitOps",
    "BitSerial",
    "CostModel",
    "Layer",
    "LayerTable",
    "LookupTable",
    "Registry",
    "UncountedOpsError",
    "WeightMemory",
    "bits_vector",
    "cost_models",
    "get_cost_model",
    "profile",
]
