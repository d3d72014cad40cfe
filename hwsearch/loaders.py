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
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .tensors import score

__all__ = ["EpochBatches", "LoaderData", "as_source"]


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


def _length(obj) -> int | None:
    """Samples in a Dataset or under a DataLoader (None when it cannot say)."""
    try:
        return len(obj.dataset if isinstance(obj, DataLoader) else obj)
    except TypeError:
        return None


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class EpochBatches(Sampler):
    """This rank's slice of each global batch of a seeded permutation (``seed`` set before each epoch): the
    order and the sharding ``TensorData`` uses, for a Dataset (the last partial global batch dropped)."""

    def __init__(self, n: int, batch_size: int) -> None:
        from . import dist

        self.n, self.batch_size = n, batch_size
        self.local, self.rank = dist.local_batch(batch_size), dist.rank()
        self.seed = 0

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for i in range(0, self.n - self.batch_size + 1 if self.n >= self.batch_size else 1, self.batch_size):
            yield perm[i + self.rank * self.local:i + (self.rank + 1) * self.local]

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)


class LoaderData:
    """Batches from a user's Dataset or DataLoader, on ``device``.

    Args:
        train, test: a ``Dataset`` (batched here: shuffled with the run's seed, the last partial batch
            dropped, as hwsearch's own data; under torchrun each rank takes its slice of every global
            batch and its shard of the test set) or a ``DataLoader`` (used as it is, with its own batch
            size, sampler and workers; under torchrun give it a ``DistributedSampler``, whose ``set_epoch``
            is called), yielding ``(input, target)``.
        batch_size: the global training batch for a ``Dataset``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``; default cross-entropy.
        eval_fn: ``eval_fn(model) -> float``, higher is better; default top-1 on ``test``.
        metric: the name of what ``eval_fn`` returns (default: top1, or the function's name).
        name: what plans record as the dataset.
        num_classes: recorded with a checkpoint (None when the output is not class logits).
        num_workers: DataLoader worker processes for a ``Dataset`` (persistent when > 0).
        test_batch: the test batch size for a ``Dataset``.

    Raises:
        ValueError: a loader that does not yield ``(input, target)``, or an empty one.
    """

    def __init__(self, train: Dataset | DataLoader, test: Dataset | DataLoader, *, device: torch.device | str = "cpu",
                 batch_size: int = 128, loss_fn: Callable | None = None, eval_fn: Callable | None = None,
                 metric: str | None = None, name: str | None = None, num_classes: int | None = None,
                 num_workers: int = 0, test_batch: int = 1000) -> None:
        from . import dist

        for what, obj in (("train", train), ("test", test)):
            if not isinstance(obj, (Dataset, DataLoader)):
                raise ValueError(f"{what}: expected a torch.utils.data Dataset or DataLoader, got {_describe(obj)}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn: expected a callable loss_fn(output, target), got {_describe(loss_fn)}")
        if eval_fn is not None and not callable(eval_fn):
            raise ValueError(f"eval_fn: expected a callable eval_fn(model) -> float, got {_describe(eval_fn)}")
        self.device = torch.device(device)
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.metric = metric or ("top1" if eval_fn is None else getattr(eval_fn, "__name__", "metric"))
        self.name = name or f"custom:{_describe(train.dataset if isinstance(train, DataLoader) else train)}"
        self.num_classes = num_classes
        self._first_x = self._first(train, "train", batch_size).to(self.device)
        self._first(test, "test", 1)
        self.mean = self.std = None
        common = {"num_workers": num_workers, "pin_memory": self.device.type == "cuda",
                  "persistent_workers": num_workers > 0}
        self.n_train, self.n_test = _length(train), _length(test)
        self.sampler = None
        if isinstance(train, Dataset):
            self.sampler = EpochBatches(len(train), batch_size)
            train = DataLoader(train, batch_sampler=self.sampler, **common)
        if isinstance(test, Dataset):
            n, w, r = len(test), dist.world_size(), dist.rank()
            shard = Subset(test, range(n * r // w, n * (r + 1) // w))  # this rank's contiguous part
            test = DataLoader(shard, batch_size=test_batch, shuffle=False, **common)
        self.train, self.test = train, test

    def _first(self, obj, what: str, count: int) -> torch.Tensor:
        """The inputs of the first batch (of a Dataset: its first ``count`` samples, batched), checked to be
        (input, target) pairs; they set the input shape and the PACT clips' starting range."""
        where = f"{what} {'loader' if isinstance(obj, DataLoader) else 'dataset'}"
        try:
            if isinstance(obj, DataLoader):
                return _check_pair(next(iter(obj)), where)[0]
            if len(obj) == 0:
                raise IndexError
            return torch.stack([_check_pair(obj[i], where)[0] for i in range(min(count, len(obj)))])
        except (StopIteration, IndexError):
            raise ValueError(f"{where}: is empty") from None

    def to(self, device) -> LoaderData:
        self.device = torch.device(device)
        self._first_x = self._first_x.to(self.device)
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self._first_x.shape[1:])

    @property
    def preprocessing(self) -> dict | None:
        """None: the user's loader prepares inputs; hwsearch does not know how."""
        return None

    def _batches(self, loader: DataLoader, where: str) -> Iterator[tuple[torch.Tensor, object]]:
        for batch in loader:
            x, y = _check_pair(batch, where)
            yield _to(x, self.device), _to(y, self.device)

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """One epoch of training batches on the device, in an order drawn from ``generator``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) if generator else 0
        if self.sampler is not None:
            if batch_size != self.sampler.batch_size:
                raise ValueError(f"batch_size: these batches were built for {self.sampler.batch_size}, "
                                 f"asked {batch_size}")
            self.sampler.seed = seed
        elif hasattr(getattr(self.train, "sampler", None), "set_epoch"):
            self.train.sampler.set_epoch(seed % (2**31 - 1))
        return self._batches(self.train, "train loader")

    def test_batches(self, batch_size: int = 1000):
        """The test split's batches on the device, in order (under torchrun, this rank's shard)."""
        return self._batches(self.test, "test loader")

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        try:
            return max(1, len(self.train))
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

    from .tensors import TensorData

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
