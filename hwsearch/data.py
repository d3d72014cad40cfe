"""Dataset registry and readers: each named dataset decoded once into a ``TensorData`` (``hwsearch.tensors``:
uint8 tensors held on the training device and augmented there), and ImageFolder trees read as users
have them (resized, grayscale kept, non-images skipped; cached by content).

Names: ``digits`` (scikit-learn's bundled 8x8 digits; offline), ``cifar10`` and ``svhn``
(torchvision; downloaded where the network allows), ``imagefolder:PATH`` (``PATH/train/<class>/*``
and ``PATH/test/<class>/*``; PATH may also be a ``.tar.gz`` of that layout).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cost_models import Registry

from .files import atomic_path, write_text
from .tensors import TensorData, check_score

log = logging.getLogger("hwsearch")

__all__ = ["DatasetUnavailable", "TensorData", "cache_dir", "check_score", "datasets", "load_dataset"]


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and cannot be downloaded here."""


def cache_dir() -> Path:
    """Where hwsearch caches data and FP32 checkpoints (``$HWSEARCH_CACHE`` or ``~/.cache/hwsearch``)."""
    return Path(os.environ.get("HWSEARCH_CACHE", Path.home() / ".cache" / "hwsearch"))


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


class Listing(NamedTuple):
    """An ImageFolder's image files, sorted, with their class indices, per split. Listed once per load
    (``list_imagefolder``) and handed to each step that needs it: on a set of a million files, every
    listing is a walk of the whole tree."""

    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


def list_imagefolder(path: Path, classes: list[str]) -> Listing:
    """Every image file of ``path/train`` and ``path/test`` (see ``_image_files``)."""
    return Listing(_image_files(path / "train", classes), _image_files(path / "test", classes))


def survey(path: Path, classes: list[str], listing: Listing | None = None) -> dict:
    """What deciding how to load an ImageFolder needs, from file names and one image header: the number
    of train and test images, the first image's size and its channels (1 for grayscale)."""
    from PIL import Image

    listing = listing or list_imagefolder(path, classes)
    train, test = listing.train[0], listing.test[0]
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


def _read_split(split: tuple[list[str], list[int]], channels: int, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split (its files and labels); images whose size differs from the first one's are resized
    (``open_image``) to ``size``, or to the first image's shorter side when no size is given."""
    import functools

    files, labels = split
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


def content_key(path: Path, classes: list[str], listing: Listing | None = None) -> str:
    """A digest of the folder's content listing: every image's path relative to ``path``, size and
    modification time. Deleting, adding or rewriting an image changes it; reading the folder does not."""
    listing = listing or list_imagefolder(path, classes)
    h = hashlib.sha256()
    for split in (listing.train, listing.test):
        for f in split[0]:
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
    # The shallowest folder holding train/ and test/, level by level: a walk of the whole tree (rglob)
    # would visit every image of a large set on each load.
    level = [dest]
    while level:
        for d in level:
            if (d / "train").is_dir() and (d / "test").is_dir():
                return d
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir())
    raise ValueError(f"imagefolder: {archive} holds no train/ and test/ folders")


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


def load_imagefolder(path: str | Path, *, image_size: int | None = None, listing: Listing | None = None) -> TensorData:
    """Decode ``PATH/train`` and ``PATH/test`` (ImageFolder layout, or a .tar.gz of it) once, then cache.

    Images keep one channel when the first is grayscale (else RGB). With ``image_size``, or when their
    sizes differ, they are resized (shorter side) and centre-cropped to a square at decoding; training
    then augments on the device with the recipe for that size (``recipe_for``). The decoded tensors are
    cached by the folder's content (``content_key``): a folder whose images changed is decoded again
    (and the log says so), never served from a stale cache.
    """
    path, classes = imagefolder_root(path)
    listing = listing or list_imagefolder(path, classes)
    channels = survey(path, classes, listing)["channels"]
    key = content_key(path, classes, listing)
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
            x_tr, y_tr = _read_split(listing.train, channels, image_size)
            square = x_tr.shape[-1] if x_tr.shape[-1] == x_tr.shape[-2] else None
            x_te, y_te = _read_split(listing.test, channels, image_size or square)
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
