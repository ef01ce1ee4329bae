"""One training step and what it is built from, shared by the loop and the benchmarks.

The inputs of a step are a pure function of (seed, epoch, step, rank): a run killed at any step and
resumed from its checkpoint draws the same augmentations and reproduces the uninterrupted run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data import Preprocess, random_crop, random_erasing, random_flip, to_float
from resnetlab.errors import ResnetlabError
from resnetlab.models import first_conv
from resnetlab.train.recipes import Recipe

__all__ = [
    "NonFiniteLoss",
    "StepClock",
    "augment_generator",
    "lr_factor",
    "make_optimizer",
    "train_inputs",
    "train_step",
    "xavier_init",
]


class NonFiniteLoss(ResnetlabError):
    """The loss became NaN or infinite; the last good checkpoint, if there is one, is kept."""


def xavier_init(net: nn.Module) -> None:
    """The chapter's ``train_ch6`` init: Xavier-uniform on every Conv2d and Linear weight."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)


def lr_factor(recipe: Recipe, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step`` (a pure function: nothing to save but the step)."""
    warm = max(1, int(recipe.warmup * total_steps)) if recipe.warmup > 0 else 0
    if step < warm:  # every schedule warms up linearly when asked (constant too: HF's constant_with_warmup)
        return (step + 1) / warm
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    if recipe.schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine


def make_optimizer(recipe: Recipe, net: nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on BN parameters and biases, the usual choice for ResNets, nor on a whitened
    # stem, whose frozen filters must not shrink (its BatchNorm undoes the scale of the others).
    frozen = {id(first_conv(net).weight)} if recipe.whiten_stem else set()
    decay = [p for p in net.parameters() if p.ndim > 1 and id(p) not in frozen]
    no_decay = [p for p in net.parameters() if p.ndim <= 1 or id(p) in frozen]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter for the whole update, on CPU and CUDA (docs/performance.md)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, fused=True)


def augment_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, step, rank): resumable without saved state."""
    # Modulo 2**64, torch's seed range: the product overflows it from seed ~18,000 on, and torch
    # itself takes any seed modulo 2**64, so every seed that fitted keeps its exact generator.
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank) % 2**64)


def train_inputs(
    images: torch.Tensor, recipe: Recipe, preprocess: Preprocess, gen: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """uint8 batch -> float, resized (to ``size``, default the test size), augmented, normalised model input.

    All of it batched on the device.
    """
    x = to_float(images)
    size = size or preprocess.size
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    augs = recipe.augmentations()
    if "crop" in augs:
        x = random_crop(x, recipe.crop_padding, gen)
    if "flip" in augs:
        x = random_flip(x, gen)
    x = (x - preprocess.mean) / preprocess.std
    if "erase" in augs:
        x = random_erasing(x, gen)
    if recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    amp_dtype: torch.dtype | None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under autocast, the finiteness check, backward, update.

    Args:
        model: the network (DDP- or compile-wrapped), in train mode.
        x: the batch's model inputs; labels: its labels.
        optimizer: updates the parameters; scaler: fp16's loss scaler (disabled otherwise).
        loss_fn: the loss, computed in fp32 on the logits.
        amp_dtype: autocast dtype (None: fp32).
        check_finite: check the loss before the update (a host sync: free on the CPU, so callers on a
            GPU check every few steps only).

    Returns:
        (loss, logits), both still attached to the device.

    Raises:
        NonFiniteLoss: the loss is NaN or infinite; nothing was updated.
    """
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
        loss = loss_fn(logits.float(), labels)
    if check_finite and not torch.isfinite(loss).item():
        raise NonFiniteLoss(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


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
