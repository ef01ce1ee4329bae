"""torch.distributed glue: one process needs none of it; torchrun sets the environment for many.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), each process joins the process
group (gloo on CPU, NCCL on GPU), takes its own device and shard of every epoch, and only rank 0
writes the run directory. Everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def wrap(net: nn.Module, ctx: DistContext) -> nn.Module:
    if ctx.world_size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if td.is_available() and td.is_initialized():
        t = t.clone()
        td.all_reduce(t)
    return t


def barrier() -> None:
    if td.is_available() and td.is_initialized():
        td.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not (td.is_available() and td.is_initialized()):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def synchronized_time(device: torch.device) -> float:
    """A clock reading after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
