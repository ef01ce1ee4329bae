"""torch.distributed glue: one process needs none of it; torchrun sets the environment for many.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), each process joins the process
group (gloo on CPU, NCCL on GPU), takes its own device and shard of every epoch, and only rank 0
writes the run directory. Everything here is a no-op for a single process.

Also here: BatchNorm synchronised across ranks on the CPU (PyTorch's ``SyncBatchNorm`` runs on
GPUs only), the automatic resume of a worker that torchelastic restarted, and a debug hook that
records the global per-step loss.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from torch import nn

from resnetlab.errors import CheckpointError, UsageError
from resnetlab.fileio import CHECKPOINT_NAME

# Opt-in debug hook: rank 0 appends one JSON line per training step with the loss averaged over
# the global batch (one extra all-reduce per step; used by the tests to compare world sizes).
STEP_LOSS_ENV = "RESNETLAB_DEBUG_STEP_LOSSES"


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
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun instead (see the README).
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


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _active():
        t = t.clone()
        td.all_reduce(t)
    return t


def barrier() -> None:
    if _active():
        td.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(net: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Without SyncBatchNorm each rank's last forward updated its running statistics with its own
    shard; evaluating after this makes every rank score the model the checkpoint holds.
    """
    if not _active():
        return
    for buf in net.buffers():
        td.broadcast(buf, src=0)


def global_sums(sums: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The epoch's running sums over all ranks, as a checkpoint stores them (timings stay this rank's)."""
    if not _active():
        return sums
    t = all_reduce_sum(torch.tensor([sums["loss"], sums["correct"], sums["count"]], dtype=torch.float64, device=device))
    loss, correct, count = t.tolist()
    return {**sums, "loss": loss, "correct": int(correct), "count": int(count)}


def share_of_sums(sums: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """A resumed rank's part of a checkpoint's global sums: all of them on rank 0, none elsewhere."""
    return sums if ctx.is_main else {**sums, "loss": 0.0, "correct": 0, "count": 0}


def check_agree(value: Any, what: str) -> None:
    """Raise the same CheckpointError on every rank unless all ranks hold an equal ``value``."""
    if not _active():
        return
    values: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise CheckpointError(
            f"ranks {differ} disagree with rank 0 about {what} ({values[differ[0]]!r} vs {values[0]!r}); "
            "every node must see the same --out / --resume directory (use a shared file system)"
        )


class StepClock:
    """Seconds spent inside training steps (the chapter's compute-only measure), summed.

    On the CPU a step is done when its Python returns, so ``perf_counter`` brackets it. On CUDA the
    host queues work ahead of the GPU; synchronising around every step to read a clock would stall
    that queue, so CUDA events are recorded in the stream instead and read once, in :meth:`take`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        self.seconds = 0.0
        self._start: Any = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        end = self._now()
        if self.cuda:
            self.spans.append((self._start, end))
        else:
            self.seconds += end - self._start

    def take(self) -> float:
        """The seconds since the last take (waits for the device's queued steps), and reset."""
        if self.spans:
            self.spans[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        seconds, self.seconds, self.spans = self.seconds, 0.0, []
        return seconds


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm on the CPU


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of every rank's copy is summed back to each input."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        td.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks, over gloo.

    The state dict is BatchNorm2d's, key for key, so checkpoints load into the plain model. Each
    rank computes its shard's mean and variance, one all-reduce sums (count, sum, sum of squares)
    in float64, and autograd carries the gradient back through the same all-reduce: the result
    equals one process normalising the whole global batch. Outside training, or without a process
    group, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active() and td.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 under autocast: statistics in fp32
        c = xf.shape[1]
        n_local = xf.numel() // c
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean_l, var_l = mean_l.double(), var_l.double()
        count = torch.full((1,), float(n_local), dtype=torch.float64, device=xf.device)
        stats = _AllReduceSum.apply(torch.cat([count, mean_l * n_local, (var_l + mean_l * mean_l) * n_local]))
        n = stats[0]
        mean = stats[1 : 1 + c] / n
        var = (stats[1 + c :] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps).to(xf.dtype)
        shift = -mean.to(xf.dtype) * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        y = xf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> batch statistics over all ranks: PyTorch's SyncBatchNorm on GPUs, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return _convert_cpu(net)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        # Like nn.SyncBatchNorm.convert_sync_batchnorm: the same parameters and buffers, re-homed.
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                               device="meta")  # fmt: skip
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = _convert_cpu(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


# ----------------------------------------------------------------------------------------------
# Fault tolerance: a worker restarted by torchelastic continues its run


def restart_count() -> int:
    """How many times torchelastic has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``; a fresh uuid under ``--standalone``), else None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def restarted_run(out: str | os.PathLike | None) -> str | None:
    """What a worker that torchelastic (re)started should do with ``--out``: ``"resume"``, ``"restart"`` or None.

    Only when ``out``'s config.json names this torchrun job (its ``torchelastic_run_id``, which is
    ``--rdzv-id``, or a fresh uuid under ``--standalone``): then this is a restart of the job that
    wrote it, and the run resumes from ``out``'s checkpoint, or starts over when the failure came
    before the first one. The restart count alone cannot tell: on a node restarted because another
    node failed it stays 0. With torchrun's default id "none", shared by every job, a restart count
    above 0 is required as well. A directory another job wrote is never taken over: that case is
    the usual "already exists" error.
    """
    if not out or job_id() is None or (job_id() == "none" and restart_count() < 1):
        return None
    run_dir = Path(out)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("torchelastic_run_id") != job_id():
        return None

    return "resume" if (run_dir / CHECKPOINT_NAME).is_file() else "restart"


def check_world_size(saved: int | None, world_size: int, run_dir: Path) -> None:
    """A run resumes only on the world size it was trained with (global batch, shards and lr depend on it)."""
    if saved is not None and int(saved) != world_size:
        raise UsageError(
            f"{run_dir} was trained by {saved} process(es) but this run has {world_size}; "
            f"resume it with {saved} (e.g. --nproc {saved}): the global batch, the data shards and "
            "--scale-lr depend on the world size"
        )


# ----------------------------------------------------------------------------------------------
# Debug hook


def record_step_loss(epoch: int, step: int, loss: torch.Tensor, count: int) -> None:
    """With $RESNETLAB_DEBUG_STEP_LOSSES set: rank 0 appends the global mean loss of this step."""
    path = os.environ.get(STEP_LOSS_ENV)
    if not path:
        return
    t = torch.stack([loss.detach().double() * count, torch.tensor(float(count), dtype=torch.float64, device=loss.device)])
    t = all_reduce_sum(t).tolist()
    if not _active() or td.get_rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "loss": t[0] / t[1], "count": int(t[1]),
                                "restart": restart_count()}) + "\n")  # fmt: skip
