"""One run across processes: ``torchrun --nproc_per_node N -m hwsearch run ...``.

PyTorch's engine does the work: the process group (NCCL on GPUs, gloo on CPUs) that torchrun's
environment describes, ``DistributedDataParallel`` for the gradients (``hwsearch.train.fit``), and
torchrun itself for starting workers and ending the job when one dies. hwsearch adds what a
quantization run needs on top: every rank draws the same shuffle and takes its slice of each global
batch; the test split is sharded and the counts summed, so every test image counts once; batch-norm
statistics re-estimated on each rank's slice are averaged; rank 0 alone writes files and shows
progress. Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

__all__ = ["all_sum", "barrier", "broadcast_object", "is_main", "rank", "setup", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


def setup(device: str = "auto") -> str:
    """Join the process group torchrun describes (once per process), and return the device this rank
    trains on: ``cuda:LOCAL_RANK`` on GPUs, else the one asked for. Returns ``device`` unchanged
    outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_shutdown)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu" if device == "auto" else device


def _shutdown() -> None:
    """At exit: wait for every rank, then close the process group. A rank that exits while the group's
    threads still run (the others still writing, say) can abort in C++ ("terminate called without an
    active exception"); torchrun then reports the job failed although every rank finished."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def backend() -> str | None:
    return dist.get_backend() if world_size() > 1 else None


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj=None, src: int = 0):
    """``obj`` from rank ``src`` on every rank (any picklable object)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place, and returned)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_mean_(tensors) -> None:
    """Average each tensor over ranks, in place (batch-norm statistics after re-estimation)."""
    if world_size() <= 1:
        return
    for t in tensors:
        if t.is_floating_point():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world_size())


def sync_buffers(model) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics, which each rank updated with its
    own batches since DistributedDataParallel last broadcast them)."""
    if world_size() <= 1:
        return
    for t in model.buffers():
        dist.broadcast(t, src=0)


def local_batch(batch_size: int) -> int:
    """Each rank's share of the global batch.

    Raises:
        ValueError: a world size that does not divide the global batch.
    """
    w = world_size()
    if batch_size % w:
        raise ValueError(f"--batch-size: the global batch {batch_size} is split over {w} processes and must "
                         f"be a multiple of {w}")
    return batch_size // w
