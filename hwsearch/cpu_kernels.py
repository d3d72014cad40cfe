"""The fused CPU kernels of ``hwsearch/csrc`` (PACT forward and backward in one pass each), built on
first use with ``torch.utils.cpp_extension`` and cached by torch under ``~/.cache/torch_extensions``.

A machine without a C++ compiler or ninja still trains: ``pact_ops()`` then returns None, warns once
why, and ``hwsearch.fused.FusedPact`` uses its ATen version, which computes the same values. Set
``HWSEARCH_CPU_KERNELS=0`` to use the ATen version on purpose.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["pact_ops"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "pact_cpu.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _ninja_on_path() -> None:
    """torch calls ``ninja`` by name; the ``ninja`` wheel (a dependency) puts it in the environment's
    scripts folder, which is not on PATH when the environment is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _build():
    # torch logs a warning on importing cpp_extension without a CUDA runtime; these kernels are CPU-only
    cuda_log = logging.getLogger("torch.utils.cpp_extension")
    level, cuda_log.level = cuda_log.level, logging.ERROR
    try:
        from torch.utils import cpp_extension
    finally:
        cuda_log.setLevel(level)

    _ninja_on_path()
    log.debug("loading the fused CPU kernels (built on first use, once per machine and torch version)")
    # -fopenmp: at::parallel_for is inline OpenMP; the library it links is torch's own libgomp.so.1
    # (same soname, already loaded), so the kernels share torch's threads and thread count.
    # -fno-trapping-math lets the compiler turn the per-element selects into vector blends.
    cpp_extension.load(name="hwsearch_cpu_kernels", sources=[str(SOURCE)],
                       extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"], extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    return torch.ops.hwsearch


def pact_ops():
    """``torch.ops.hwsearch`` with ``pact_forward`` and ``pact_backward``, or None where they cannot
    be had (disabled by ``HWSEARCH_CPU_KERNELS=0``, or the build failed: warned once)."""
    if os.environ.get("HWSEARCH_CPU_KERNELS", "1") == "0":
        return None
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                try:
                    _state["ops"] = _build()
                except Exception as exc:  # no compiler, no ninja, no headers: train on the ATen path
                    _state["ops"] = None
                    last_line = (str(exc).strip().splitlines() or [""])[-1]  # the compiler's own words
                    warnings.warn(f"hwsearch: fused CPU kernels unavailable, using the slower ATen path "
                                  f"({type(exc).__name__}: {last_line})", RuntimeWarning, stacklevel=2)
    return _state["ops"]
