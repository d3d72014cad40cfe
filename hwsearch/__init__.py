"""hwsearch: hardware-aware mixed-precision quantization search for PyTorch (SINAREQ).

``quantize(model, train, test, budgets=...)`` and ``search(model, train, test, trials=...)`` take a
user's own trained model and data; ``hwsearch.run.run(RunConfig)`` and
``hwsearch.study.search(SearchConfig)`` take names, as the command line does.
"""

from cost_models import LayerTable, get_cost_model, profile

from .api import quantize, search  # noqa: E402  (after .search's submodule import: the function wins the name)
from .checkpoint import load_quantized
from .config import RunConfig
from .costs import cost_report, uniform_bits
from .data import TensorData, load_dataset
from .export import export_onnx
from .loaders import LoaderData
from .models import create_model, list_models
from .plan import load_plan
from .profiling import profile_model
from .run import RunResult

__version__ = "0.2.0"

__all__ = [
    "LayerTable",
    "LoaderData",
    "RunConfig",
    "RunResult",
    "TensorData",
    "__version__",
    "cost_report",
    "create_model",
    "export_onnx",
    "get_cost_model",
    "list_models",
    "load_dataset",
    "load_plan",
    "load_quantized",
    "profile",
    "profile_model",
    "quantize",
    "search",
    "uniform_bits",
]
