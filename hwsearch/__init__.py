"""hwsearch: hardware-aware mixed-precision quantization search for PyTorch (SINAREQ)."""

from cost_models import LayerTable, get_cost_model, profile

from .costs import cost_report, uniform_bits
from .data import TensorData, load_dataset
from .export import export_onnx, load_quantized
from .models import create_model, list_models
from .profiling import profile_model

__version__ = "0.1.0"

__all__ = [
    "LayerTable",
    "TensorData",
    "__version__",
    "cost_report",
    "export_onnx",
    "create_model",
    "get_cost_model",
    "list_models",
    "load_dataset",
    "load_quantized",
    "profile",
    "profile_model",
    "uniform_bits",
]
