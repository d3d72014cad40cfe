"""A user's trained FP32 weights from a file, loaded safely and checked against the model.

Accepted: a ``state_dict``, or a dict holding one under ``state_dict``, ``model`` or
``model_state_dict`` (what common training scripts save); a ``module.`` prefix that
``DataParallel``/``DistributedDataParallel`` adds is stripped. Files are read with
``torch.load(weights_only=True)``, which never runs code from the file. Every key and every shape
must match the model: a partial load would quantize half-trained weights without a word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["file_sha256", "load_weights", "read_state_dict"]

_WRAPPERS = ("state_dict", "model_state_dict", "model")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _first(names, count: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:count]) + (f" (and {len(names) - count} more)" if len(names) > count else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (unwrapped, ``module.`` stripped).

    Raises:
        ValueError: a missing file, a file that needs full unpickling, or one that holds no state_dict.
    """
    path = Path(path).expanduser()
    where = f"--weights {path}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "pickle" in type(exc).__name__.lower():
            raise ValueError(
                f"{where}: refused: the file holds Python objects that only full unpickling can rebuild (a whole "
                f"pickled model, say), and unpickling can run any code; hwsearch loads weights with "
                f"torch.load(weights_only=True). Save a plain state_dict instead: "
                f"torch.save(model.state_dict(), {str(path)!r})") from None
        raise ValueError(f"{where}: cannot be read as a PyTorch file: {first}") from None
    if isinstance(blob, Mapping):
        for key in _WRAPPERS:
            inner = blob.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                blob = inner
                break
    if not isinstance(blob, Mapping) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"{where}: holds no state_dict (a dict of tensors, or one under "
                         f"{', '.join(repr(k) for k in _WRAPPERS)}); got {type(blob).__name__}")
    state = dict(blob)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load the FP32 weights in ``path`` into ``model`` (in place), every key and shape checked.

    Returns:
        ``{"path": str, "sha256": str}``: what a plan records so that ``apply`` starts from the same weights.

    Raises:
        ValueError: see ``read_state_dict``; keys missing or unexpected (the first few named); a tensor
        whose shape differs from the model's (named, with both shapes).
    """
    state = read_state_dict(path)
    where = f"--weights {Path(path).expanduser()}"
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        parts = [f"missing keys {_first(missing)}" if missing else "", f"unexpected keys {_first(unexpected)}"
                 if unexpected else ""]
        raise ValueError(f"{where}: does not fit the model: {'; '.join(p for p in parts if p)}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(own[name].shape)}")
    model.load_state_dict(state)
    return {"path": str(Path(path).expanduser().resolve()), "sha256": file_sha256(Path(path).expanduser())}
