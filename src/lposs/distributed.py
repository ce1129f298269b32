"""Runs under ``torchrun``: this process's rank, and a gloo process group for barriers and
sums of small integer lists (what the ranks produce is exchanged through files: evaluation
records, segmentation outputs). Used by ``lposs.evaluation`` and the ``segment`` command."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from .errors import LpossError

__all__ = ["distributed_context", "ProcessGroup", "process_group"]


def distributed_context() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without.

    Raises:
        LpossError: the variables are set but malformed.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LpossError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LpossError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


class ProcessGroup:
    """A gloo process group for barriers and small sums (None members without torchrun)."""

    def __init__(self, world: int, handle: Any = None) -> None:
        self.world, self.handle = world, handle

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.handle)

    def sum(self, values: list[int]) -> list[int]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, group=self.handle)
        return t.tolist()


@contextlib.contextmanager
def process_group(world: int) -> Iterator[ProcessGroup]:
    """Joins (or starts, and then ends) the default process group when ``world`` > 1.

    Only CPU tensors are exchanged, so a gloo group is used whatever the models' device.
    """
    if world == 1:
        yield ProcessGroup(1)
        return
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:  # long timeout: ranks can wait at the final barrier for a slow neighbour
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    elif dist.get_world_size() != world:
        raise LpossError(f"the process group has {dist.get_world_size()} ranks, "
                         f"WORLD_SIZE says {world}")
    handle = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        yield ProcessGroup(world, handle)
    finally:
        if created:
            dist.destroy_process_group()
