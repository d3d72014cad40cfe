"""Dataset registry. Small datasets are decoded once and held as uint8 tensors on the
training device; augmentation (random crop, flip) runs there with batched tensor ops,
so a training step makes no host copies.

Names: ``digits`` (scikit-learn's bundled 8x8 digits; offline), ``cifar10`` and ``svhn``
(torchvision; downloaded where the network allows), ``imagefolder:PATH`` (``PATH/train/<class>/*``
and ``PATH/test/<class>/*``; PATH may also be a ``.tar.gz`` of that layout).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cost_models import Registry

from .files import atomic_path, write_text

log = logging.getLogger("hwsearch")

__all__ = ["DatasetUnavailable", "TensorData", "cache_dir", "check_score", "datasets", "load_dataset"]


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and cannot be downloaded here."""


def cache_dir() -> Path:
    """Where hwsearch caches data and FP32 checkpoints (``$HWSEARCH_CACHE`` or ``~/.cache/hwsearch``)."""
    return Path(os.environ.get("HWSEARCH_CACHE", Path.home() / ".cache" / "hwsearch"))


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
            if limit is not None and limit < len(y):
                idx = torch.randperm(len(y), generator=g)[:limit].to(y.device)
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


datasets: Registry = Registry("dataset")


@datasets.register("digits")
def _digits(root: Path | None = None) -> TensorData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.2, random_state=0,
                                              stratify=bunch.target)
    mean, std = float(images.mean() / 255), float(images.std() / 255)
    return TensorData("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                      torch.from_numpy(x_te), torch.from_numpy(y_te).long(), 10, (mean,), (std,),
                      pad=1, flip=False)  # flipping changes a digit's meaning


def _torchvision_dataset(cls_name: str, root: Path | None, **split_kwargs):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root or cache_dir() / "data")
    out = []
    for kwargs in split_kwargs.values():
        try:
            out.append(cls(str(root), download=False, **kwargs))
        except RuntimeError:
            try:
                out.append(cls(str(root), download=True, **kwargs))
            except Exception as exc:
                raise DatasetUnavailable(
                    f"{cls_name} is not in {root} and could not be downloaded ({type(exc).__name__}); "
                    f"put it there, or use imagefolder:PATH with train/ and test/ folders") from None
    return out


@datasets.register("cifar10")
def _cifar10(root: Path | None = None) -> TensorData:
    train, test = _torchvision_dataset("CIFAR10", root, train={"train": True}, test={"train": False})
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return TensorData("cifar10", to_t(train.data), torch.tensor(train.targets), to_t(test.data),
                      torch.tensor(test.targets), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@datasets.register("svhn")
def _svhn(root: Path | None = None) -> TensorData:
    train, test = _torchvision_dataset("SVHN", root, train={"split": "train"}, test={"split": "test"})
    return TensorData("svhn", torch.from_numpy(train.data), torch.from_numpy(train.labels).long(),
                      torch.from_numpy(test.data), torch.from_numpy(test.labels).long(), 10,
                      (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), flip=False)


# What torchvision's ImageFolder takes as an image; anything else (.DS_Store, Thumbs.db, notes) is skipped.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def open_image(path: str, channels: int = 3, size: int | None = None):
    """A PIL image in ``channels`` (1: grayscale, 3: RGB); with ``size``, resized so that its shorter side is
    ``size`` and centre-cropped to ``size``x``size`` (a square image of that size is left as it is).

    Raises:
        ValueError: a file PIL cannot read, named.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"imagefolder: cannot read image {path}: {exc}") from None
    if size and im.size != (size, size):
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def _decode(path: str, channels: int = 3, size: int | None = None) -> np.ndarray:
    a = np.asarray(open_image(path, channels, size), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def survey(path: Path, classes: list[str]) -> dict:
    """What deciding how to load an ImageFolder needs, from file names and one image header: the number
    of train and test images, the first image's size and its channels (1 for grayscale)."""
    from PIL import Image

    train, _ = _image_files(path / "train", classes)
    test, _ = _image_files(path / "test", classes)
    try:
        with Image.open(train[0]) as im:
            size, mode = im.size, im.mode
    except OSError as exc:
        raise ValueError(f"imagefolder: cannot read image {train[0]}: {exc}") from None
    return {"n_train": len(train), "n_test": len(test), "size": size, "channels": 1 if mode in GRAY_MODES else 3}


def _image_files(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every image file (by extension) under ``split_dir/<class>/``, sorted, with its class index."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        names = sorted(p for p in (split_dir / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        files += [str(p) for p in names]
        labels += [label] * len(names)
    if not files:
        raise ValueError(f"imagefolder: no images under {split_dir}")
    return files, labels


def _read_split(split_dir: Path, classes: list[str], channels: int, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split; images whose size differs from the first one's are resized (``open_image``) to
    ``size``, or to the first image's shorter side when no size is given."""
    import functools

    files, labels = _image_files(split_dir, classes)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(functools.partial(_decode, channels=channels, size=size), files, chunksize=512))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:  # sizes differ and no size was asked: the first image's shorter side, square
        side = min(images[0].shape[:2])
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            images = list(pool.map(functools.partial(_decode, channels=channels, size=side), files, chunksize=512))
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def _classes(path: Path) -> list[str]:
    """The class folders, which train/ and test/ must share (a class missing from one would shift labels)."""
    train = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
    test = sorted(p.name for p in (path / "test").iterdir() if p.is_dir())
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        parts = [f"only in train/: {', '.join(only_train[:5])}" if only_train else "",
                 f"only in test/: {', '.join(only_test[:5])}" if only_test else ""]
        raise ValueError(f"imagefolder: {path}: train/ and test/ hold different classes "
                         f"({'; '.join(p for p in parts if p)})")
    if not train:
        raise ValueError(f"imagefolder: {path}/train holds no class folders")
    return train


def content_key(path: Path, classes: list[str]) -> str:
    """A digest of the folder's content listing: every image's path relative to ``path``, size and
    modification time. Deleting, adding or rewriting an image changes it; reading the folder does not."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for f in _image_files(path / split, classes)[0]:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _lock(name: str):
    """A lock file under the cache: processes (search workers) that share the cache unpack and
    decode a dataset once, one at a time, instead of overwriting each other's files."""
    from filelock import FileLock

    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _content_key(archive: Path) -> str:
    """A digest of the archive's bytes, remembered per (path, size, mtime) so that it is read once.

    The unpacked folder, and through the dataset's name the cached FP32 checkpoints, are keyed by
    content: a copied or re-created archive with the same bytes (a new mtime) finds them again
    instead of training a new checkpoint.
    """
    st = archive.stat()
    memo = cache_dir() / "digests" / (hashlib.sha256(
        f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16] + ".txt")
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    key = h.hexdigest()[:16]
    write_text(memo, key)
    return key


def _unpack(archive: Path) -> Path:
    key = _content_key(archive)
    dest = cache_dir() / "unpacked" / key
    with _lock(f"unpack-{key}"):
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
            (dest / ".complete").touch()
    found = [p.parent for p in dest.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    if not found:
        raise ValueError(f"imagefolder: {archive} holds no train/ and test/ folders")
    return found[0]


def imagefolder_root(path: str | Path) -> tuple[Path, list[str]]:
    """The folder holding train/ and test/ (an archive unpacked once, by content) and its classes."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"imagefolder: no such path {str(path)!r}")
    if path.is_file():
        path = _unpack(path)
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        raise ValueError(f"imagefolder: {path} must hold train/ and test/ folders of class subfolders")
    return path, _classes(path)


def recipe_for(side: int) -> str:
    """The standard training augmentation for images of this side: pad-crop and flip up to 64 pixels
    (CIFAR's), RandomResizedCrop and flip above (ImageNet's)."""
    return "pad-crop" if side <= 64 else "resized-crop"


def load_imagefolder(path: str | Path, *, image_size: int | None = None) -> TensorData:
    """Decode ``PATH/train`` and ``PATH/test`` (ImageFolder layout, or a .tar.gz of it) once, then cache.

    Images keep one channel when the first is grayscale (else RGB). With ``image_size``, or when their
    sizes differ, they are resized (shorter side) and centre-cropped to a square at decoding; training
    then augments on the device with the recipe for that size (``recipe_for``). The decoded tensors are
    cached by the folder's content (``content_key``): a folder whose images changed is decoded again
    (and the log says so), never served from a stale cache.
    """
    path, classes = imagefolder_root(path)
    channels = survey(path, classes)["channels"]
    key = content_key(path, classes)
    if channels != 3 or image_size:  # the default (RGB, own size) keeps the plain key: caches made before stay valid
        key = f"{key}-{channels}c{image_size or ''}"
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    cached = cache_dir() / "tensors" / f"imagefolder-{key}.pt"
    last = cache_dir() / "tensors" / f"imagefolder-path-{where}.txt"  # the key this path had last time
    data = None
    with _lock(f"decode-{key}"):
        if cached.exists():
            try:
                data = torch.load(cached, weights_only=True)
            except Exception:
                data = None  # corrupt cache: decode again
        if data is None:
            if last.exists() and last.read_text().strip() != key:
                log.info("imagefolder %s changed since it was cached: decoding it again", path)
            x_tr, y_tr = _read_split(path / "train", classes, channels, image_size)
            square = x_tr.shape[-1] if x_tr.shape[-1] == x_tr.shape[-2] else None
            x_te, y_te = _read_split(path / "test", classes, channels, image_size or square)
            data = {"x_train": torch.from_numpy(x_tr), "y_train": torch.from_numpy(y_tr),
                    "x_test": torch.from_numpy(x_te), "y_test": torch.from_numpy(y_te)}
            with atomic_path(cached) as tmp:
                torch.save(data, tmp)
            write_text(last, key)
    x = data["x_train"].float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    # A channel that never varies (a constant colour, a blank band) would divide by 0: floor at one level.
    std = tuple(max(v, 1 / 255) for v in x.std(dim=(0, 2, 3)).tolist())
    h = data["x_train"].shape[-1]
    return TensorData(f"imagefolder:{path}", data["x_train"], data["y_train"], data["x_test"], data["y_test"],
                      len(classes), mean, std, pad=max(1, h // 8), content=key, recipe=recipe_for(h))


def load_dataset(name: str, *, root: Path | None = None) -> TensorData:
    """Load a dataset by name as CPU tensors (``.to(device)`` moves it).

    Raises:
        KeyError: unknown name (lists the valid names).
        DatasetUnavailable: not on disk and no network.
    """
    if name.startswith("imagefolder:"):
        return load_imagefolder(name.split(":", 1)[1])
    if name not in datasets:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(datasets.names())}, imagefolder:PATH")
    return datasets.get(name)(root)
