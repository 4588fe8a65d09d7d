"""Data-parallel calibration: split the calibration batches over ranks, sum the covariances, rank 0 writes.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) every process runs the same ``slice``. Each
computes the layers on its own share of the calibration batches; the covariance sums are all-reduced before
each eigendecomposition (:meth:`hf_slicegpt.slicing.pca.Covariance.all_reduce`), so every rank derives the same basis
and holds the same sliced weights; rank 0 writes the checkpoint. Nothing here is needed on one process: every
helper is a no-op when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when a launcher (torchrun, accelerate) started this process as one of several ranks."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1


def local_device(device: str | torch.device | None = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is there and no device was asked for."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_environment(device: str | torch.device | None = None, timeout_s: float = 3600) -> bool:
    """Join the process group a launcher described in the environment (NCCL on CUDA, gloo on CPU).

    Returns ``True`` if this process is (now) one rank of several. Safe to call twice. The timeout is long
    because a rank may wait at a collective while another is loading a large model.
    """
    if is_initialized():
        return world_size() > 1
    if not launched_by_torchrun():
        return False
    target = local_device(device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    logger.info("Data-parallel calibration: rank %d of %d (%s on %s)", rank(), world_size(), backend, target)
    return True


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (rank ``r`` of ``n`` gets the ``r``-th of ``n`` near-equal runs).

    Whole batches are dealt out, never split, so each batch is computed exactly as on one process and the
    covariance sums differ from a single process's only in the order of the float64 additions.
    """
    n, size = len(items), world_size()
    if size == 1:
        return list(items)
    start, stop = shard_start(n), (rank() + 1) * n // size
    return list(items[start:stop])


def shard_start(n: int) -> int:
    """The index of this rank's first item in :func:`shard` of ``n`` items."""
    return rank() * n // world_size() if world_size() > 1 else 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s copy (in place, also for CPU tensors under NCCL)."""
    if not (is_initialized() and world_size() > 1):
        return tensor
    if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to("cuda")
        torch.distributed.broadcast(moved, src)
        tensor.copy_(moved.to(tensor.device))
    else:
        torch.distributed.broadcast(tensor, src)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (moving through the GPU under NCCL)."""
    if not (is_initialized() and world_size() > 1):
        return tensor
    if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to("cuda")
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved.to(tensor.device))
    else:
        torch.distributed.all_reduce(tensor)
    return tensor


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


__all__ = [
    "all_reduce_sum_",
    "barrier",
    "broadcast_",
    "destroy",
    "init_from_environment",
    "is_initialized",
    "is_main_process",
    "launched_by_torchrun",
    "local_device",
    "rank",
    "shard",
    "shard_start",
    "world_size",
]
