"""A user's own data as a source of batches: a ``torch.utils.data.Dataset`` (hwsearch batches it) or a
``DataLoader`` (used as it is), yielding ``(input, target)``.

``LoaderData`` offers what ``TensorData`` offers (``train_batches``, ``test_batches``,
``steps_per_epoch``, ``calibration_batch``, ``loss``, ``score``), so every phase (FP32 evaluation,
bit learning, the allocators' measurements, plan training, batch-norm recalibration) reads a user's
pipeline exactly as it reads hwsearch's own tensors. Inputs reach the model as the loader yields them:
normalization is the user's. Batches move to the training device with non-blocking copies (from
pinned memory when the loader pins it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import score

__all__ = ["LoaderData", "as_source"]


def _describe(obj) -> str:
    return type(obj).__name__


def _check_pair(batch, where: str) -> tuple[torch.Tensor, object]:
    """The batch as ``(input, target)``, or a ValueError that says what the loader yielded instead."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {_describe(batch)}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"{where}: must yield (input, target) pairs, got {got}")
    x = batch[0]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: the input of a batch must be a tensor, got {_describe(x)}")
    return x, batch[1]


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class LoaderData:
    """Batches from a user's Dataset or DataLoader, on ``device``.

    Args:
        train, test: a ``Dataset`` (batched here: shuffled with the run's seed, the last partial
            batch dropped, as hwsearch's own data) or a ``DataLoader`` (used as it is, with its own
            batch size, sampler and workers), yielding ``(input, target)``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``; default cross-entropy.
        eval_fn: ``eval_fn(model) -> float``, higher is better; default top-1 on ``test``.
        metric: the name of what ``eval_fn`` returns (default: top1, or the function's name).
        name: what plans record as the dataset.
        num_classes: recorded with a checkpoint (None when the output is not class logits).

    Raises:
        ValueError: a loader that does not yield ``(input, target)``, or an empty one.
    """

    def __init__(self, train: Dataset | DataLoader, test: Dataset | DataLoader, *, device: torch.device | str = "cpu",
                 loss_fn: Callable | None = None, eval_fn: Callable | None = None, metric: str | None = None,
                 name: str | None = None, num_classes: int | None = None, num_workers: int = 0) -> None:
        for what, obj in (("train", train), ("test", test)):
            if not isinstance(obj, (Dataset, DataLoader)):
                raise ValueError(f"{what}: expected a torch.utils.data Dataset or DataLoader, got {_describe(obj)}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn: expected a callable loss_fn(output, target), got {_describe(loss_fn)}")
        if eval_fn is not None and not callable(eval_fn):
            raise ValueError(f"eval_fn: expected a callable eval_fn(model) -> float, got {_describe(eval_fn)}")
        self.train, self.test = train, test
        self.device = torch.device(device)
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.metric = metric or ("top1" if eval_fn is None else getattr(eval_fn, "__name__", "metric"))
        self.name = name or f"custom:{_describe(train.dataset if isinstance(train, DataLoader) else train)}"
        self.num_classes = num_classes
        self.num_workers = num_workers
        first = self._first(train, "train")
        self._first(test, "test")
        self._first_x = first.to(self.device)
        self.mean = self.std = None

    def _first(self, obj, what: str) -> torch.Tensor:
        """The first batch's input (a Dataset's first sample, batched), checked to be (input, target)."""
        where = f"{what} {'loader' if isinstance(obj, DataLoader) else 'dataset'}"
        try:
            if isinstance(obj, DataLoader):
                batch = next(iter(obj))
            else:
                batch = obj[0]
        except (StopIteration, IndexError):
            raise ValueError(f"{where}: is empty") from None
        x, _ = _check_pair(batch, where)
        return x if isinstance(obj, DataLoader) else x.unsqueeze(0)

    def to(self, device) -> LoaderData:
        self.device = torch.device(device)
        self._first_x = self._first_x.to(self.device)
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self._first_x.shape[1:])

    @property
    def preprocessing(self) -> None:
        """None: the user's loader prepares inputs; hwsearch does not know how."""
        return None

    def _loader(self, obj, batch_size: int, generator: torch.Generator | None, *, train: bool) -> DataLoader:
        if isinstance(obj, DataLoader):
            sampler = getattr(obj, "sampler", None)
            if train and generator is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
            return obj
        cpu_gen = None
        if train and generator is not None:
            # The shuffle follows the run's seeded generator (on whatever device it lives).
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            cpu_gen = torch.Generator().manual_seed(seed)
        return DataLoader(obj, batch_size=batch_size, shuffle=train, drop_last=train and len(obj) >= batch_size,
                          generator=cpu_gen, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _batches(self, loader: DataLoader, where: str) -> Iterator[tuple[torch.Tensor, object]]:
        for batch in loader:
            x, y = _check_pair(batch, where)
            yield _to(x, self.device), _to(y, self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """One epoch of training batches on the device."""
        return self._batches(self._loader(self.train, batch_size, generator, train=True), "train loader")

    def test_batches(self, batch_size: int = 1000):
        """The test split's batches on the device, in order."""
        return self._batches(self._loader(self.test, batch_size, None, train=False), "test loader")

    def steps_per_epoch(self, batch_size: int) -> int:
        try:
            if isinstance(self.train, DataLoader):
                return max(1, len(self.train))
            return max(1, len(self.train) // batch_size)
        except TypeError:
            raise ValueError("train: the loader has no length; the learning-rate schedule and the freeze "
                             "point need the number of steps (give a map-style Dataset, or a DataLoader "
                             "over one)") from None

    def calibration_batch(self, batch_size: int) -> torch.Tensor:
        return self._first_x

    def loss(self, output, target) -> torch.Tensor:
        return F.cross_entropy(output, target) if self.loss_fn is None else self.loss_fn(output, target)

    def score(self, model) -> float:
        return score(self, model)


def as_source(train, test=None, *, device: torch.device | str = "cpu", **kwargs):
    """The source of batches for ``train``/``test``: hwsearch's own ``TensorData`` (``test`` None) as
    it is (moved to ``device``, with ``loss_fn``/``eval_fn``/``metric`` set when given), or a
    ``LoaderData`` over a user's Dataset or DataLoader pair."""
    from dataclasses import replace

    from .data import TensorData

    if isinstance(train, TensorData):
        if test is not None:
            raise ValueError("test: a TensorData holds its own test split; pass test=None")
        extra = {k: kwargs[k] for k in ("loss_fn", "eval_fn", "metric") if kwargs.get(k) is not None}
        if "eval_fn" in extra and "metric" not in extra:
            extra["metric"] = getattr(extra["eval_fn"], "__name__", "metric")
        return replace(train, **extra).to(device)
    if test is None:
        raise ValueError("test: give the test Dataset or DataLoader (the split the metric is taken on)")
    return LoaderData(train, test, device=device, **kwargs)
