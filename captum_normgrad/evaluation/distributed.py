"""torch.distributed as torchrun launches it, and the same code as a world of one without it.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``); a
process group is created only then: NCCL when CUDA is there (each process on GPU ``LOCAL_RANK``),
gloo on CPU. Images are shared by striding, image ``i`` to rank ``i % world_size``: each image
goes to exactly one process, with none padded in (``DistributedSampler`` repeats images to even
out the shares, which would count them twice).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "barrier", "launched_by_torchrun", "process_group", "shard"]


@dataclass(frozen=True)
class World:
    """This process's place: its rank, how many processes there are, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that merges and writes the final files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[World]:
    """Join torchrun's process group for the duration of the block (a world of one without it).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). Under torchrun with CUDA
            each process takes GPU ``LOCAL_RANK``.

    Yields:
        The :class:`World`. The group is destroyed on leaving, also when the block raises.
    """
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not launched_by_torchrun():
        yield World(
            0,
            1,
            torch.device("cuda" if use_cuda else "cpu") if device is None else torch.device(device),
        )
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
    else:
        here = torch.device("cpu")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), here)
    finally:
        if created:
            dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every process (nothing to wait for in a world of one)."""
    if world.world_size > 1:
        if world.device.type == "cuda":
            dist.barrier(device_ids=[world.device.index])
        else:
            dist.barrier()


def shard(count: int, world: World) -> range:
    """The indices of ``count`` items this process takes: ``rank, rank + world_size, ...``."""
    return range(world.rank, count, world.world_size)
