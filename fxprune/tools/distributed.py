"""Running under ``torchrun``: the process group, and values combined over the processes."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["process_group", "mean_over_processes", "gather_over_processes"]


def process_group() -> tuple[int, int]:
    """(rank, world size), starting the process group (nccl with GPUs, else gloo) when ``torchrun`` launched this
    process (``WORLD_SIZE`` > 1); (0, 1) otherwise.

    A group started here is destroyed when the interpreter exits, while it is still whole: left to the interpreter's
    own teardown, gloo's worker threads can abort the process (``terminate called without an active exception``)
    after all the work is done. A group the caller started is left to the caller."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_destroy_if_initialized)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _destroy_if_initialized() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_processes(value: float, world: int) -> float:
    """``value`` averaged over the ``world`` processes."""
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / world


def gather_over_processes(value: Any, world: int) -> list[Any]:
    """Every process's ``value``, in rank order."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
