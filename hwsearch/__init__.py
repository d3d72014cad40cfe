"""hwsearch: hardware-aware mixed-precision quantization search for PyTorch (SINAREQ)."""

from cost_models import LayerTable, get_cost_model, profile

from .costs import cost_report, uniform_bits
from .data import TensorData, load_dataset
from .models import create_model, list_models
from .profiling import profile_model

__version__ = "0.1.0"

__all__ = [
    "LayerTable",
    "TensorData",
    "__version__",
    "cost_report",
    "create_model",
    "get_cost_model",
    "list_models",
    "load_dataset",
    "profile",
    "profile_model",
    "uniform_bits",
]
