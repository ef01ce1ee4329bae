"""resnetlab's training engine one step at a time, and interleaved timing of several engines.

``ResnetlabTrainer`` is the body of :func:`resnetlab.train.train` built from the same pieces
(``BatchLoader`` on the device, batched ``train_inputs``, ``make_optimizer``, ``xavier_init``,
``resolve_precision``), with each lever a switch so that the benchmark can turn one off at a time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from resnetlab.bench.machine import num_threads, synchronize
from resnetlab.bench.reference import PILDataset, chapter_transform, forever
from resnetlab.data import BatchLoader, Preprocess, Split
from resnetlab.device import autocast_dtype, resolve_precision
from resnetlab.errors import UsageError
from resnetlab.models import create_model
from resnetlab.train.recipes import get_recipe
from resnetlab.train.step import NonFiniteLoss, augment_generator, make_optimizer, train_inputs, train_step, xavier_init


class Stepper(Protocol):
    device: torch.device

    def step(self) -> int: ...


class ResnetlabTrainer:
    """resnetlab's loop on the chapter's task, one step at a time: ``step()`` -> images trained.

    Args:
        data: ``"memory"`` (resnetlab: uint8 split on the device, one index per batch, batched
            resize) or ``"dataloader"`` (the chapter's per-sample PIL DataLoader feeding the same loop).
        precision: ``auto`` (bf16 only where it is native), ``fp32`` or ``bf16``.
        base_recipe: the recipe whose other fields (width, stem, init, optimizer, augmentation) apply.
    """

    def __init__(
        self,
        train: Split,
        *,
        base_recipe: str = "d2l",
        model: str = "d2l_resnet18",
        batch_size: int = 256,
        resize: int | None = 96,
        lr: float = 0.05,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        compile: bool = False,
        precision: str = "auto",
        data: str = "memory",
        num_workers: int = 4,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":  # as the loop does; a process-wide switch, so the reference side gets it too
            torch.backends.cudnn.benchmark = True
        self.recipe = get_recipe(
            base_recipe,
            model=model,
            batch_size=batch_size,
            resize=resize or 0,
            lr=lr,
            seed=seed,
            channels_last=channels_last,
            compile=compile,
            precision=precision,
            device=str(self.device),
        )
        self.precision = resolve_precision(self.recipe.precision, self.device)
        self.data = data
        c = train.images.shape[1]
        self.preprocess = Preprocess(resize or None, [0.0] * c, [1.0] * c).to(self.device)
        torch.manual_seed(seed)
        net = create_model(model, num_classes=len(train.classes), in_chans=c, **self.recipe.model_options())
        if self.recipe.init == "xavier":
            xavier_init(net)
        net.to(self.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        self.net = net
        self.optimizer = make_optimizer(self.recipe, net, lr)
        self.model = torch.compile(net) if compile else net
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.autocast = autocast_dtype(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if data == "memory":
            self.loader: Any = BatchLoader(train, batch_size, shuffle=True, seed=seed, device=self.device)
            self._batches: Iterator[Any] = self._memory_batches()
        elif data == "dataloader":
            self.loader = torch.utils.data.DataLoader(
                PILDataset(train, chapter_transform(resize)), batch_size, shuffle=True, num_workers=num_workers
            )
            self._batches = forever(self.loader)
        else:
            raise ValueError(f"data must be 'memory' or 'dataloader', not {data!r}")
        self.steps = 0

    def _memory_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            yield from self.loader.batches(epoch)
            epoch += 1

    def step(self) -> int:
        self.model.train()
        images, labels = next(self._batches)
        if images.dtype == torch.uint8:
            x = train_inputs(
                images, self.recipe, self.preprocess, augment_generator(self.recipe.seed, 0, self.steps, 0)
            )
        else:
            x = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        try:  # the loop's own step; the finiteness check as the loop's: every step on the CPU
            loss, logits = train_step(
                self.model,
                x,
                labels,
                self.optimizer,
                self.scaler,
                self.loss_fn,
                self.autocast,
                check_finite=self.device.type == "cpu" or self.steps % 20 == 0,
            )
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"{err} at benchmark step {self.steps}") from None
        (logits.argmax(dim=1) == labels).sum()  # the loop's running accuracy
        self.steps += 1
        return len(labels)


def interleaved(steppers: dict[str, Stepper], steps: int, warmup: int, block: int = 1) -> dict[str, dict[str, Any]]:
    """Warm every stepper up, then time ``steps`` steps of each, alternating who goes first.

    Steps are timed in runs of ``block`` (the last run may be shorter), data included (fetching the
    batch is inside the step), so a slow-down of the shared machine hits both sides alike. On the
    CPU ``block=1`` times each step on its own. On a GPU the clock is read after synchronising, and
    a synchronisation after every step would also stop the host from queueing the next step while
    the GPU runs this one, which a training loop does not do: time runs of steps there. Returns per
    name: images/s over all timed steps, images/s of the median run (per step) and the seconds per
    step of each run.
    """
    if block < 1:
        raise UsageError(f"block must be >= 1, not {block}")
    for _ in range(warmup):
        for s in steppers.values():
            s.step()
            synchronize(s.device)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    seconds: dict[str, float] = {name: 0.0 for name in steppers}
    images: dict[str, int] = {name: 0 for name in steppers}
    names = list(steppers)
    for i, first in enumerate(range(0, steps, block)):
        run = min(block, steps - first)
        for name in names if i % 2 == 0 else names[::-1]:
            s = steppers[name]
            t0 = time.perf_counter()
            n = sum(s.step() for _ in range(run))
            synchronize(s.device)
            elapsed = time.perf_counter() - t0
            times[name].append(elapsed / run)
            seconds[name] += elapsed
            images[name] += n
    out = {}
    for name in names:
        per_step = images[name] / max(1, steps)
        out[name] = {
            "images_per_s": images[name] / max(seconds[name], 1e-12),
            "median_step_images_per_s": per_step / max(statistics.median(times[name]), 1e-12) if times[name] else 0.0,
            "step_seconds": [round(t, 4) for t in times[name]],
        }
    return out


LEVERS = ("channels_last", "compile", "bf16", "in_memory_data", "one_thread")


class WithThreads:
    """Run another stepper's steps with ``threads`` intra-op threads (restored after each step)."""

    def __init__(self, inner: Stepper, threads: int) -> None:
        self.inner, self.threads, self.device = inner, threads, inner.device

    def step(self) -> int:
        with num_threads(self.threads):
            return self.inner.step()


def measure_levers(
    train: Split,
    names: list[str],
    *,
    model: str,
    batch_size: int,
    resize: int | None,
    steps: int,
    warmup: int,
    device: torch.device,
    num_workers: int,
    base: dict[str, Any],
    log: Any = None,
) -> dict[str, dict[str, Any]]:
    """For each lever: resnetlab's engine with it off vs on (everything else as ``base``), interleaved.

    ``ratio`` is images/s with the lever on over images/s with it off (> 1: the lever helps).
    """
    results = {}
    for lever in names:
        if lever not in LEVERS:
            raise ValueError(f"unknown lever {lever!r}; choose from {', '.join(LEVERS)} or all")
        off, on = dict(base), dict(base)
        if lever == "channels_last":
            off["channels_last"], on["channels_last"] = False, True
        elif lever == "compile":
            off["compile"], on["compile"] = False, True
        elif lever == "bf16":
            off["precision"], on["precision"] = "fp32", "bf16"
        elif lever == "in_memory_data":
            off["data"], on["data"] = "dataloader", "memory"
        common = dict(model=model, batch_size=batch_size, resize=resize, device=device, num_workers=num_workers)
        t0 = time.perf_counter()
        steppers: dict[str, Stepper] = {
            "off": ResnetlabTrainer(train, **common, **off),
            "on": ResnetlabTrainer(train, **common, **on),
        }
        if lever == "one_thread":  # on: 1 intra-op thread; off: torch's default (all cores)
            steppers["on"] = WithThreads(steppers["on"], 1)
        first = time.perf_counter()
        steppers["on"].step()  # compiles when the lever is compile: report that time on its own
        first = time.perf_counter() - first
        r = interleaved(steppers, steps, warmup)
        results[lever] = {
            "ratio": round(r["on"]["images_per_s"] / r["off"]["images_per_s"], 3),
            "ratio_median_step": round(r["on"]["median_step_images_per_s"] / r["off"]["median_step_images_per_s"], 3),
            "on_images_per_s": round(r["on"]["images_per_s"], 2),
            "off_images_per_s": round(r["off"]["images_per_s"], 2),
            "first_step_seconds": round(first, 1),
            "batch_size": batch_size,
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if log:
            log(
                f"lever {lever}: x{results[lever]['ratio']:.2f} ({results[lever]['on_images_per_s']:.1f} vs "
                f"{results[lever]['off_images_per_s']:.1f} images/s at batch {batch_size}, {steps} steps)"
            )
        del steppers
    return results
