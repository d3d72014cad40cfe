"""hwsearch's own source of batches: a whole dataset as uint8 tensors on the training device, augmented
there a batch at a time with batched tensor ops (pad-crop, random resized crop, flip), so a training
step makes no host copies; and the evaluation every source shares (top-1, or a user's ``eval_fn``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TensorData", "check_score", "normalize", "pad_crop", "random_flip", "resized_crop", "score",
           "subset_indices", "top1"]


@dataclass(frozen=True)
class TensorData:
    """A whole image-classification dataset as tensors: one of the two sources of batches that every
    phase reads (the other is ``hwsearch.loaders.LoaderData``, over a user's Dataset or DataLoader).

    ``x_*`` are uint8 ``[N, C, H, W]``, ``y_*`` int64 ``[N]``. ``pad`` and ``flip`` set the
    training augmentation (random crop with ``pad`` pixels of zero padding, horizontal flip).
    ``loss_fn(output, target)`` and ``eval_fn(model) -> float`` (higher is better), when given,
    replace cross-entropy and top-1; ``metric`` names what ``score`` returns.

    The interface every phase uses: ``train_batches``, ``test_batches``, ``steps_per_epoch``,
    ``calibration_batch``, ``loss``, ``score``, ``input_shape``, ``device``, ``num_classes``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4
    flip: bool = True
    recipe: str = "pad-crop"  # training augmentation: pad-crop (32-pixel sets) | resized-crop (larger images)
    loss_fn: Callable | None = None
    eval_fn: Callable | None = None
    metric: str = "top1"
    content: str = ""  # a digest of the files it was read from (ImageFolder), part of the FP32 cache key

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, *self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> TensorData:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")})

    def subset(self, max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> TensorData:
        """A fixed random subset (same seed, same subset) for quick presets."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for split, limit in (("train", max_train), ("test", max_test)):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            idx = subset_indices(len(y), limit, g)
            if idx is not None:
                idx = idx.to(y.device)
                x, y = x[idx], y[idx]
            out[f"x_{split}"], out[f"y_{split}"] = x, y
        return replace(self, **out)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop (zero padding) and flip of a uint8 batch, on its device, in one gather; for larger
        images (``recipe="resized-crop"``) a random resized crop instead (``resized_crop``)."""
        if self.recipe == "resized-crop":
            x = resized_crop(x, generator)
        elif self.pad:
            x = pad_crop(x, self.pad, generator)
        return random_flip(x, generator) if self.flip else x

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled, augmented, normalized batches (the last partial batch is dropped).

        Under torchrun ``batch_size`` is the global batch: every rank draws the same shuffle (the same
        seeded generator) and takes its own slice of each global batch."""
        from . import dist

        n = len(self.y_train)
        local, r = dist.local_batch(batch_size), dist.rank()
        perm = torch.randperm(n, device=self.device, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[i + r * local:i + (r + 1) * local]
            yield self.normalize(self.augment(self.x_train[idx], generator)), self.y_train[idx]

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test split in order; under torchrun, this rank's contiguous shard of it."""
        from . import dist

        n, w, r = len(self.y_test), dist.world_size(), dist.rank()
        lo, hi = n * r // w, n * (r + 1) // w
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            yield self.normalize(self.x_test[i:j]), self.y_test[i:j]

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch of ``train_batches`` (the last partial batch is dropped)."""
        return max(1, len(self.y_train) // batch_size)

    def calibration_batch(self, batch_size: int) -> torch.Tensor:
        """The first ``batch_size`` training inputs, normalized, unaugmented (PACT clips start from it)."""
        return self.normalize(self.x_train[:batch_size])

    @property
    def preprocessing(self) -> dict:
        """How a raw uint8 image becomes the model's input: ``(x/255 - mean)/std``, channels in order."""
        return {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std),
                "input_shape": list(self.input_shape), "channels": "RGB" if self.x_train.shape[1] == 3 else "L",
                "layout": "NCHW"}

    def loss(self, output, target) -> torch.Tensor:
        return F.cross_entropy(output, target) if self.loss_fn is None else self.loss_fn(output, target)

    def score(self, model) -> float:
        """The metric on the test split (higher is better): ``eval_fn(model)``, or top-1 in [0, 1]."""
        return score(self, model)


def subset_indices(n: int, limit: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """The indices of a fixed random subset of ``limit`` of ``n`` items (None: all of them, in order). The
    train split draws first and the test split next from one generator, in memory and in stream mode
    alike, so both train on the same images."""
    return torch.randperm(n, generator=generator)[:limit] if limit is not None and limit < n else None


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels to the model's input: (x/255 - mean)/std per channel, as floats."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def pad_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop of each image of a uint8 batch after ``pad`` pixels of zero padding, in one gather."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    return xp[torch.arange(b, device=x.device)[:, None, None, None],
              torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of the batch flipped horizontally with probability 1/2."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop (Szegedy et al. 2015; torchvision's defaults) of a whole uint8 batch on its device:
    each image's box (area ``scale`` of the image, aspect ``ratio``) cut out and resized back to the
    image's size by ``torchvision.ops.roi_align`` (bilinear), in one call for the batch."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, device=dev).uniform_(*scale, generator=generator)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    x0 = torch.rand(b, device=dev, generator=generator) * (w - cw)
    y0 = torch.rand(b, device=dev, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(b, device=dev, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def top1(model, batches, device=None) -> float:
    """Top-1 accuracy of ``model`` over ``(input, target)`` batches, in [0, 1]; one host sync at the end.
    Under torchrun the batches are this rank's shard and the counts are summed over ranks."""
    from . import dist

    counts = None
    for x, y in batches:
        step = torch.stack([(model(x).argmax(1) == y).sum(), torch.tensor(len(y), device=y.device)])
        counts = step if counts is None else counts + step
    if counts is None:
        counts = torch.zeros(2, dtype=torch.long, device=device)
    correct, count = dist.all_sum(counts).tolist()
    if not count:
        raise ValueError("test data: no test samples")
    return correct / count


def check_score(value, what: str = "eval_fn") -> float:
    """A metric value as a finite float, or a ValueError that says what came back."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what}: must return a number (higher is better), got {type(value).__name__}")
    if not np.isfinite(float(value)):
        raise ValueError(f"{what}: returned {float(value)}; it must return a finite number (higher is better)")
    return float(value)


def score(data, model) -> float:
    """``data.eval_fn(model)`` (checked to be a finite number) or top-1 on ``data``'s test batches,
    with the model in eval mode; the model's mode is restored."""
    was = model.training
    model.eval()
    try:
        if data.eval_fn is not None:
            with torch.no_grad():
                return check_score(data.eval_fn(model))
        return top1(model, data.test_batches(), data.device)
    finally:
        model.train(was)
