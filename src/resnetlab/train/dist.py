"""torch.distributed glue: one process needs none of it; torchrun sets the environment for many.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), each process joins the process
group (gloo on CPU, NCCL on GPU), takes its own device and shard of every epoch, and only rank 0
writes the run directory. Everything here is a no-op for a single process.

The process group and its collectives only: BatchNorm across ranks on the CPU is in ``syncbn``,
torchelastic's restarts and the per-step loss hook in ``elastic``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td
from torch import nn

from resnetlab.errors import CheckpointError


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
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store()
        if store is None:
            td.init_process_group(backend)
        else:
            td.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device)


def _attempt_store() -> td.Store | None:
    """torchrun's shared store, with a key space of its own for this restart (None: the default).

    torchrun (since 2.5) hands every restart of the worker group the same TCPStore, still holding
    the previous attempt's keys: a restarted rank can read a dead peer's address from it and fail
    with "Connection refused" (pytorch/pytorch#135712, #167288). On one node every worker sees the
    same ``TORCHELASTIC_RESTART_COUNT``, which then names a fresh key space. Across nodes the count
    can differ (a node restarted for another's failure keeps its own), so there set
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun instead (see docs/distributed.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    store, _, _ = next(td.rendezvous("env://"))
    return td.PrefixStore(f"resnetlab/attempt{restart_count()}", store)


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


def active() -> bool:
    return td.is_available() and td.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        t = t.clone()
        td.all_reduce(t)
    return t


def barrier() -> None:
    if active():
        td.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(net: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Without SyncBatchNorm each rank's last forward updated its running statistics with its own
    shard; evaluating after this makes every rank score the model the checkpoint holds.
    """
    if not active():
        return
    for buf in net.buffers():
        td.broadcast(buf, src=0)


def share_of_sums(sums: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """A resumed rank's part of a checkpoint's global sums: all of them on rank 0, none elsewhere."""
    return sums if ctx.is_main else {**sums, "loss": 0.0, "correct": 0, "count": 0}


def check_agree(value: Any, what: str) -> None:
    """Raise the same CheckpointError on every rank unless all ranks hold an equal ``value``."""
    if not active():
        return
    values: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise CheckpointError(
            f"ranks {differ} disagree with rank 0 about {what} ({values[differ[0]]!r} vs {values[0]!r}); "
            "every node must see the same --out / --resume directory (use a shared file system)"
        )


def restart_count() -> int:
    """How many times torchelastic has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
