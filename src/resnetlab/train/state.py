"""What a run carries from step to step and what a checkpoint saves of it.

:class:`TrainState` owns what a resume restores (network, optimizer, scaler, normalisation,
position, the epoch's running sums, the curve's rows, the finished epochs); :class:`EpochMeter`
the sums of the steps since the curve's last row; :class:`Checkpointer` the rules of writing it
(rank 0 writes, every rank waits; a run stopped before its first checkpoint while an old run waits
aside gives it back).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.checkpoint import OPTIMIZER_KERNEL_FLAGS, load_weights, prefixed, save_checkpoint
from resnetlab.data import Preprocess
from resnetlab.fileio import CHECKPOINT_NAME
from resnetlab.train import dist
from resnetlab.train.lookahead import Lookahead
from resnetlab.train.rundir import RunFiles, plot_curves, write_metrics
from resnetlab.train.signals import TrainingInterrupted, stopped
from resnetlab.train.step import NonFiniteLoss, StepClock

__all__ = ["EMPTY_INTERVAL", "EMPTY_SUMS", "ROWS_PER_EPOCH", "EpochMeter", "TrainState", "Checkpointer", "progress_bar"]

# An epoch's running sums (a checkpoint saves them mid-epoch): loss, correct and count over all ranks, up to
# the curve's last row; the seconds are this rank's.
EMPTY_SUMS = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0, "compute_seconds": 0.0}
# The steps since the curve's last row, over all ranks (a checkpoint between two rows saves them).
EMPTY_INTERVAL = {"loss": 0.0, "correct": 0, "count": 0}
# The curve: a row of training loss and accuracy after every ceil(steps / ROWS_PER_EPOCH)-th step of an
# epoch and after its last, so at least this many rows per epoch (the chapter's Animator draws 5).
ROWS_PER_EPOCH = 10


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores.

    Args:
        net: the network (not the DDP or compiled wrapper).
        optimizer: its optimizer; scaler: fp16's loss scaler.
        preprocess: the normalisation (a resumed run keeps its saved mean and std).
        lookahead: the slow copy of the weights, where the recipe asks for one.
        epoch, step: where the run stands (the next step to take).
        sums: the current epoch's running sums (:data:`EMPTY_SUMS`) up to the curve's last row.
        interval: the steps since the curve's last row, as a checkpoint saved them (:data:`EMPTY_INTERVAL`);
            this rank's share once restored.
        curve: the curve's rows so far (``kind`` ``"step"``), every epoch's.
        history: the finished epochs' metrics rows.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    preprocess: Preprocess
    lookahead: Lookahead | None = None
    epoch: int = 0
    step: int = 0
    sums: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_SUMS))
    interval: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_INTERVAL))
    curve: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: weights, optimizer state, generator states, the lookahead's slow copy."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        if self.lookahead is not None:
            tensors.update({f"lookahead.{k}": v for k, v in self.lookahead.slow.items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        return tensors

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups without their parameters (JSON)."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]

    def restore(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device, ctx: dist.DistContext
    ) -> None:
        """Take a checkpoint's state (validated by ``request.resumed_run``)."""
        load_weights(self.net, prefixed(tensors, "model."), "checkpoint weights do not fit the model")
        if self.lookahead is not None:
            for key, value in prefixed(tensors, "lookahead.").items():
                self.lookahead.slow[key].copy_(value)
        self.preprocess.mean.copy_(torch.tensor(meta["preprocessing"]["mean"]).view_as(self.preprocess.mean))
        self.preprocess.std.copy_(torch.tensor(meta["preprocessing"]["std"]).view_as(self.preprocess.std))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # the state dict's indices
        state: dict[int, dict[str, Any]] = {}
        for key, value in prefixed(tensors, "optim.").items():
            index, name = key.split(".", 1)
            param = params[int(index)]
            if value.shape == param.shape:
                # a file holds contiguous tensors; the fused CPU kernels read every tensor of a parameter in the
                # parameter's memory order without checking strides (channels_last: a wrong update, silently)
                value = torch.empty_like(param, dtype=value.dtype).copy_(value)
            state.setdefault(int(index), {})[name] = value.to(device)
        groups = self.optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, meta["optimizer"]):
            # the settings, not how this version runs them: older checkpoints say foreach, not fused
            group.update({k: v for k, v in saved.items() if k not in OPTIMIZER_KERNEL_FLAGS})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        self.epoch, self.step = meta["position"]["epoch"], meta["position"]["step"]
        self.sums, self.history = dict(meta["sums"]), meta["history"]
        self.curve = list(meta.get("curve", []))  # none in checkpoints written before the curve had rows
        self.interval = dist.share_of_sums(meta.get("interval", dict(EMPTY_INTERVAL)), ctx)


class EpochMeter:
    """Loss, correct predictions and images of the steps since the curve's last row, on the device (no host sync
    per step), and the seconds since the last :meth:`take_seconds`.

    Args:
        device: where the steps run.
        interval: where to start from (a resumed run's saved :attr:`TrainState.interval`): a step's loss is added
            to the same float64 sum whether or not the run was stopped and resumed between two rows, so the rows
            of a resumed run are those of the uninterrupted one.
    """

    def __init__(self, device: torch.device, interval: dict[str, Any]) -> None:
        self.loss = torch.tensor(float(interval["loss"]), device=device, dtype=torch.float64)
        self.correct = torch.tensor(int(interval["correct"]), device=device, dtype=torch.int64)
        self.count = int(interval["count"])
        self.clock = StepClock(device)
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach().double() * len(labels)
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.count += len(labels)

    def interval(self) -> dict[str, Any]:
        """The sums since the last row over all ranks (waits for the queued steps; a collective under torchrun)."""
        total = dist.all_reduce_sum(
            torch.stack(
                [
                    self.loss,
                    self.correct.double(),
                    torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device),
                ]
            )
        ).tolist()
        return {"loss": total[0], "correct": int(total[1]), "count": int(total[2])}

    def take_interval(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Close the interval: its sums over all ranks, added to the epoch's ``sums`` too; start the next at zero."""
        interval = self.interval()
        for key in EMPTY_INTERVAL:
            sums[key] += interval[key]
        self.loss.zero_(), self.correct.zero_()
        self.count = 0
        return interval

    def take_seconds(self, sums: dict[str, Any]) -> None:
        """Add the seconds since the last take to ``sums`` (waits for the queued steps)."""
        sums["compute_seconds"] += self.clock.take()
        now = time.perf_counter()
        sums["seconds"] += now - self.started
        self.started = now


class Checkpointer:
    """Writes the run's checkpoint and metrics: rank 0 writes, every rank waits.

    Args:
        files: the run directory (created and locked by rank 0 in :meth:`RunFiles.create`).
        state: what is saved.
        static: the metadata that does not change during the run (model, data, recipe...).
        ctx: the process group.
        stop: the signal flag (:func:`signals.stop_flag`).
    """

    def __init__(
        self, files: RunFiles, state: TrainState, static: dict[str, Any], ctx: dist.DistContext, stop: dict[str, Any]
    ) -> None:
        self.files, self.state, self.static, self.ctx, self.stop = files, state, static, ctx, stop
        self.run_dir: Path = files.run_dir
        self.replacing = False  # an old run waits aside (--force) for this run's first checkpoint

    def save(self) -> None:
        """Save everything needed to continue at the state's (epoch, step)."""
        state = self.state
        if self.stop["interrupted"] and self.replacing and not self.files.checkpointed:  # the old run comes back
            raise TrainingInterrupted(
                f"{stopped(self.stop)} before this run's first checkpoint; {self.run_dir} holds the "
                "run it was replacing again",
                self.stop["signal"],
            )
        if not all(torch.isfinite(p).all() for p in state.net.parameters()):
            raise NonFiniteLoss(
                f"weights became non-finite at epoch {state.epoch + 1}, step {state.step}; checkpoint not written"
            )
        if self.ctx.is_main:
            save_checkpoint(
                self.run_dir / CHECKPOINT_NAME,
                state.tensors(self.ctx.device),
                {
                    **self.static,
                    "position": {"epoch": state.epoch, "step": state.step},
                    "sums": state.sums,
                    "interval": state.interval,
                    "curve": state.curve,
                    "history": state.history,
                    "optimizer": state.optimizer_groups(),
                    "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
                },
            )
        self.files.mark_checkpointed()
        dist.barrier()

    def write_history(self, title: str) -> None:
        """metrics.jsonl/.csv and curves.png from the curve's rows and the finished epochs (rank 0)."""
        write_metrics(self.run_dir, self.state.curve, self.state.history)
        if self.state.history:
            plot_curves(self.run_dir / "curves.png", self.state.curve, self.state.history, title)


def progress_bar(total: int, desc: str, enabled: bool, done: int) -> Any:
    """A tqdm bar of ``total`` steps, ``done`` of them already (a resumed epoch), or None when not shown."""
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)
    bar.update(done)
    return bar
