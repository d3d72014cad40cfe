"""An ImageFolder streamed from disk: images decoded per batch by DataLoader worker processes, for
datasets larger than memory (ImageNet's 1.28 M images are ~190 GB decoded at 224 pixels).

``StreamData`` offers what ``TensorData`` offers, so every phase reads it the same way. Augmentation
follows the standard recipes by image size: up to 64 pixels, pad-crop and flip (CIFAR's); above,
RandomResizedCrop and flip to train, Resize and CenterCrop (side / 0.875) to test (ImageNet's).
Workers are persistent, batches come in pinned memory and move with non-blocking copies. Each epoch's
order comes from the run's seeded generator; under torchrun every rank takes its slice of each global
batch and its shard of the test split, as with ``TensorData``.

``choose_mode`` decides between holding a set in memory and streaming it: memory while the decoded
set fits under ``HWSEARCH_MEMORY_LIMIT`` (default a tenth of the available memory: decoding peaks at
several times the set's size, and the set is held on the host and again on the device).
"""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from .data import (
    Listing,
    cache_dir,
    content_key,
    imagefolder_root,
    list_imagefolder,
    open_image,
    recipe_for,
    survey,
)
from .files import write_text
from .loaders import LoaderData
from .tensors import normalize, pad_crop, random_flip, subset_indices

__all__ = ["StreamData", "choose_mode", "memory_limit"]

STATS_SAMPLE = 512  # training images the normalization statistics are taken from


def memory_limit() -> int:
    """Bytes a decoded dataset may take in memory mode: ``HWSEARCH_MEMORY_LIMIT`` (e.g. ``2GB``), else a
    tenth of the memory available now."""
    from .units import parse_quantity

    text = os.environ.get("HWSEARCH_MEMORY_LIMIT")
    if text:
        try:
            return int(parse_quantity(text, what="HWSEARCH_MEMORY_LIMIT", unit="bytes"))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return available // 10


def choose_mode(path: str, mode: str, image_size: int | None, listing: Listing | None = None) -> tuple[str, str]:
    """``memory`` or ``stream`` for the ImageFolder at ``path`` and the reason, for ``mode`` auto."""
    root, classes = imagefolder_root(path)
    if mode != "auto":  # chosen by the user: nothing to survey
        return mode, f"--data-mode {mode}"
    s = survey(root, classes, listing)
    side = image_size or min(s["size"])
    decoded = (s["n_train"] + s["n_test"]) * s["channels"] * side * side
    limit = memory_limit()
    if decoded <= limit:
        return "memory", f"decoded {decoded / 1e9:.2f} GB fits under the memory limit {limit / 1e9:.2f} GB"
    return "stream", f"decoded {decoded / 1e9:.2f} GB exceeds the memory limit {limit / 1e9:.2f} GB"


class _Folder(Dataset):
    """(image tensor, label) pairs from a file list, decoded and transformed in the worker that asks."""

    def __init__(self, files: list[str], labels: list[int], transform, channels: int) -> None:
        self.files, self.labels, self.transform, self.channels = files, labels, transform, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.files[i], self.channels)), self.labels[i]


class StreamData(LoaderData):
    """An ImageFolder decoded per batch (see the module docstring).

    Args:
        path: ``imagefolder`` path (a folder, or an archive of one).
        image_size: side of the square input (default: the first image's shorter side).
        flip: random horizontal flips in training.
        workers: DataLoader worker processes (default: cores - 1, at least 1).
        max_train, max_test: fixed random subsets (the same images ``TensorData.subset`` takes).
        listing: the folder's files, when the caller has listed them (``list_imagefolder``).
    """

    def __init__(self, path: str, *, device, image_size: int | None = None, flip: bool = True,
                 workers: int | None = None, max_train: int | None = None, max_test: int | None = None,
                 batch_size: int = 128, listing: Listing | None = None) -> None:
        from torchvision import transforms as T

        root, classes = imagefolder_root(path)
        listing = listing or list_imagefolder(root, classes)
        s = survey(root, classes, listing)
        self.side = image_size or min(s["size"])
        channels = s["channels"]
        (train_files, train_labels), (test_files, test_labels) = listing
        g = torch.Generator().manual_seed(0)
        pick_train, pick_test = subset_indices(len(train_files), max_train, g), subset_indices(len(test_files), max_test, g)
        if pick_train is not None:
            train_files, train_labels = [train_files[i] for i in pick_train], [train_labels[i] for i in pick_train]
        if pick_test is not None:
            test_files, test_labels = [test_files[i] for i in pick_test], [test_labels[i] for i in pick_test]
        key = content_key(root, classes, listing)
        self.recipe = recipe_for(self.side)
        resize = round(self.side / 0.875)
        test_tf = [T.Resize(resize), T.CenterCrop(self.side)] if self.recipe == "resized-crop" else \
            [T.Resize(self.side), T.CenterCrop(self.side)] if s["size"] != (self.side, self.side) else []
        mean, std = self._stats(key, train_files, channels, T.Compose([*test_tf, T.PILToTensor()]))
        # Workers only decode (and, for large images, take the random resized crop, which shrinks what they
        # send): uint8 tensors. The pad-crop, the flip and the normalization run on the training device, a
        # whole batch at a time, as in memory mode: a worker costs a 2-core machine little CPU.
        train_tf = [T.RandomResizedCrop(self.side)] if self.recipe == "resized-crop" else test_tf
        to_uint8 = [T.PILToTensor()]
        self.pad, self.flip = (max(1, self.side // 8) if self.recipe == "pad-crop" else 0), flip
        self.channels = channels
        self.resize = resize if self.recipe == "resized-crop" else None
        workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
        self._calibration = _Folder(train_files[:batch_size], train_labels[:batch_size],
                                    T.Compose([*test_tf, *to_uint8]), channels)
        super().__init__(_Folder(train_files, train_labels, T.Compose([*train_tf, *to_uint8]), channels),
                         _Folder(test_files, test_labels, T.Compose([*test_tf, *to_uint8]), channels),
                         device=device, batch_size=batch_size, name=f"imagefolder:{root}", num_classes=len(classes),
                         num_workers=workers, test_batch=256)
        self.mean, self.std = tuple(mean), tuple(std)
        self.content = f"{key}-stream{self.side}"

    def _first(self, obj, what: str, count: int) -> torch.Tensor:
        """The input shape from two calibration images (uint8 as the workers send them, as floats)."""
        return torch.stack([self._calibration[i][0] for i in range(min(2, len(self._calibration)))]).float()

    @staticmethod
    def _stats(key: str, files: list[str], channels: int, to_tensor) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of up to ``STATS_SAMPLE`` training images (every n-th), cached by content."""
        path = cache_dir() / "stats" / f"{key}-{channels}-{len(files)}.json"
        if path.exists():
            stats = json.loads(path.read_text())
            return stats["mean"], stats["std"]
        step = max(1, len(files) // STATS_SAMPLE)
        total = torch.zeros(3, channels, dtype=torch.float64)  # pixels, sums, sums of squares (no stacked copy)
        for f in files[::step][:STATS_SAMPLE]:
            x = to_tensor(open_image(f, channels)).double().flatten(1) / 255
            total += torch.stack([torch.full((channels,), float(x.shape[1]), dtype=torch.float64), x.sum(1),
                                  x.square().sum(1)])
        n, sums, squares = total
        mean = (sums / n).tolist()
        std = [max(v, 1 / 255) for v in (squares / n - (sums / n) ** 2).clamp_min(0).sqrt().tolist()]
        write_text(path, json.dumps({"mean": mean, "std": std}))
        return mean, std

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """One epoch of this rank's training batches, in an order drawn from ``generator``, augmented (pad-crop
        for small images, flip) and normalized on the device."""
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
        for x, y in super().train_batches(batch_size, generator):
            if self.pad:
                x = pad_crop(x, self.pad, generator)
            if self.flip:
                x = random_flip(x, generator)
            yield normalize(x, self.mean, self.std), y

    def test_batches(self, batch_size: int = 1000):
        for x, y in self._batches(self.test, "test loader"):
            yield normalize(x, self.mean, self.std), y

    def calibration_batch(self, batch_size: int) -> torch.Tensor:
        x = torch.stack([self._calibration[i][0] for i in range(min(batch_size, len(self._calibration)))])
        return normalize(x.to(self.device), self.mean, self.std)

    @property
    def preprocessing(self) -> dict:
        pre = {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std),
               "input_shape": list(self.input_shape), "channels": "RGB" if self.channels == 3 else "L",
               "layout": "NCHW"}
        if self.resize:
            pre.update({"resize": self.resize, "center_crop": self.side})
        return pre
