"""Profile a model by name: build it, pick its default input shape, count its layers."""

from __future__ import annotations

from cost_models import LayerTable, UncountedOpsError, profile

from .models import create_model, models

__all__ = ["default_input_shape", "profile_model"]


def default_input_shape(model_name: str, in_channels: int = 3) -> tuple[int, int, int, int]:
    size = models.get(model_name).input_size if model_name in models else 224
    return (1, in_channels, size, size)


def profile_model(model_name: str, input_shape: tuple[int, ...] | None = None, *,
                  num_classes: int | None = None) -> tuple[LayerTable, object]:
    """Build ``model_name`` and count its layers at ``input_shape`` (default: the model's own size).

    ``num_classes`` defaults to 1000 at ImageNet sizes (so counts match torchvision's published
    figures) and 10 otherwise.

    Raises:
        KeyError: unknown model. ValueError: a user model that fails to build or to trace.
    """
    shape = tuple(input_shape) if input_shape else None
    in_channels = shape[1] if shape and len(shape) >= 2 else 3
    shape = shape or default_input_shape(model_name, in_channels)
    if num_classes is None:
        num_classes = 1000 if shape[-1] >= 224 else 10
    model = create_model(model_name, num_classes=num_classes, in_channels=in_channels)
    try:
        table = profile(model, shape)
    except UncountedOpsError:
        raise
    except Exception as exc:
        raise ValueError(f"model {model_name!r} failed to trace at input shape {list(shape)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return table, model
