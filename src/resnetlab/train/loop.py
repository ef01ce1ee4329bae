"""The training loop: one function, readable top to bottom.

Data flows one way: uint8 dataset tensors on the device -> a whole batch indexed -> resize and
augment on the batch -> model -> metrics -> run directory. Everything random is a pure function of
(seed, epoch, step), so a run killed at any step and resumed from its checkpoint reproduces the
uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data import BatchLoader, Preprocess, Split, load_dataset, random_crop, random_erasing, random_flip, to_float
from resnetlab.device import autocast_dtype, cpu_class, describe, resolve_device, resolve_precision, warn_if_emulated
from resnetlab.checkpoint import (CUDA_RNG_BYTES, load_weights, model_skeleton, optimizer_state_spec, prefixed, read_checkpoint,
                                  resolve_checkpoint_path, save_checkpoint, tensor_mismatch, wrong_optimizer_groups)  # fmt: skip
from resnetlab.errors import CheckpointError, ResnetlabError, UsageError
from resnetlab.fileio import CHECKPOINT_NAME, PREVIOUS_RUN
from resnetlab.inference import Classifier
from resnetlab.models import check_input_size, create_model
from resnetlab.train import dist
from resnetlab.train.recipes import WARMUP_EVERY_SCHEDULE, Recipe, get_recipe, recipe_as_trained
from resnetlab.train.rundir import RunFiles, check_not_in_use, checkpoint_stamp, environment, plot_confusion, plot_curves, prepare_run_dir, write_json, write_metrics


_UNSET = object()  # no recipe field of that name

# An epoch's running sums (a checkpoint saves them mid-epoch).
EMPTY_SUMS = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0, "compute_seconds": 0.0}

# The numbers a resume reads from a checkpoint's metadata: key -> (lowest, highest, integer); none NaN or inf.
_POSITIVE = math.ulp(0.0)  # > 0: the run's closing figures divide by these
_POSITION_RANGES = {"epoch": (0, math.inf, True), "step": (0, math.inf, True)}
_SUMS_RANGES = {k: (0.0, math.inf, isinstance(v, int)) for k, v in EMPTY_SUMS.items()}
_HISTORY_RANGES = {"epoch": (1, math.inf, True), "train_loss": (0.0, math.inf, False), "train_acc": (0.0, 1.0, False),
                   "test_acc": (0.0, 1.0, False), "images_per_s": (_POSITIVE, math.inf, False),
                   "compute_images_per_s": (_POSITIVE, math.inf, False), "seconds": (_POSITIVE, math.inf, False),
                   "lr": (0.0, math.inf, False)}  # rundir.METRIC_FIELDS, each  # fmt: skip
_SCALER_RANGES = {"scale": (_POSITIVE, math.inf, False), "growth_factor": (_POSITIVE, math.inf, False),
                  "backoff_factor": (_POSITIVE, math.inf, False), "growth_interval": (1, math.inf, True),
                  "_growth_tracker": (0, math.inf, True)}  # GradScaler.state_dict() (fp16 runs)  # fmt: skip


class TrainingInterrupted(ResnetlabError):
    """Ctrl-C (exit status 130) or SIGTERM (143): the checkpoint was saved; the run can be resumed."""

    exit_code = 130
    said_by_rank_zero = True

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteLoss(ResnetlabError):
    """The loss became NaN or infinite; the last good checkpoint, if there is one, is kept."""


@dataclass
class RunResult:
    """What a finished run reports (the same figures as the run directory)."""

    run_dir: Path
    train_loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float  # whole epochs, data included
    compute_examples_per_sec: float  # the chapter's measure: time inside training steps only
    device: str
    history: list[dict[str, Any]] = field(default_factory=list)
    confusion: torch.Tensor | None = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME


# ----------------------------------------------------------------------------------------------
# Pieces the loop is built from


def xavier_init(net: nn.Module) -> None:
    """The chapter's ``train_ch6`` init: Xavier-uniform on every Conv2d and Linear weight."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, in chunks to keep memory flat."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def require_test_images(test: Split, dataset: str) -> None:
    """Refuse an empty test split up front: test accuracy divides by its size (in training after a whole epoch)."""
    if len(test) == 0:
        raise UsageError(
            f"{dataset} has no test images; add a test/ folder next to train/, or hold some out: "
            "a holdout > 0 with 2 or more images per class (folder:PATH?holdout=0.1)"
        )


def seeded_subset(split: Split, n: int, seed: int) -> Split:
    """``--subset N --seed S``: a random N-image subset of ``split`` (kept in the split's order)."""
    if n > len(split):
        raise UsageError(f"--subset {n} is larger than the {len(split)}-image training split")
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.subset(pick.sort().values)


@torch.no_grad()
def check_train_size(net: nn.Module, size: int, in_chans: int, name: str, batch_size: int, fix: str = "--resize {}") -> int:
    """Refuse sizes the model does not take, sizes at which a downsampling layer would see a 1-pixel
    map, and batches BatchNorm can't train on.

    Returns the area of the smallest map a BatchNorm normalises at ``size`` (0: no BatchNorm).

    Every ResNet here runs at any size (padding keeps maps >= 1x1), but below this limit the
    later stages compute on padding alone: a waste that is almost always a mistake. A training
    BatchNorm needs more than one value per channel: one image on a 1x1 map fails at the first
    step. Probed on a shape-only (meta) copy of the network, so it costs nothing.
    """
    check_input_size(net, size)
    measure = _map_probe(net, in_chans)
    smallest, norm_area = measure(size)
    if smallest < 2:
        fix = "use " + fix.format(next(s for s in range(size + 1, 4097) if measure(s)[0] >= 2)) + " or more"
        options = getattr(net, "options", None)  # registry models: offer the small stem where it would do
        if options and options.get("stem") != "small":
            with torch.device("meta"):
                small_stem = create_model(name, **{**options, "stem": "small"})
            if _map_probe(small_stem, in_chans)(size)[0] >= 2:
                fix += ", or --stem small"
        raise UsageError(f"input {size}x{size} is too small for {name}: a downsampling layer would see a 1x1 map; {fix}")
    if norm_area is not None and batch_size * norm_area < 2:
        raise UsageError(f"batch size {batch_size} gives {name}'s BatchNorm a single value per channel at {size}x{size} "
                         "(a 1x1 map); use --batch-size 2 or more")
    return norm_area or 0


def _map_probe(net: nn.Module, in_chans: int) -> Callable[[int], tuple[int, int | None]]:
    """side -> (the smallest map a downsampling layer sees, the smallest map area a BatchNorm
    normalises or None), measured on a shape-only (meta) copy of ``net``."""
    import copy

    probe = copy.deepcopy(net).to("meta").eval()
    seen: list[int] = []
    norm_areas: list[int] = []
    for m in probe.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and (m.stride if isinstance(m.stride, int) else m.stride[0]) > 1:
            m.register_forward_pre_hook(lambda module, inputs: seen.append(min(inputs[0].shape[-2:])))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda module, inputs: norm_areas.append(inputs[0][0, 0].numel()))

    def measure(side: int) -> tuple[int, int | None]:
        seen.clear()
        norm_areas.clear()
        probe(torch.zeros(1, in_chans, side, side, device="meta"))
        return min(seen, default=side), min(norm_areas, default=None)

    return measure


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
    # No weight decay on BN parameters and biases, the usual choice for ResNets.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov, foreach=True)


def augment_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, step, rank): resumable without saved state."""
    # Modulo 2**64, torch's seed range: the product overflows it from seed ~18,000 on, and torch
    # itself takes any seed modulo 2**64, so every seed that fitted keeps its exact generator.
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank) % 2**64)


def train_inputs(images: torch.Tensor, recipe: Recipe, preprocess: Preprocess, gen: torch.Generator,
                 size: int | None = None) -> torch.Tensor:  # fmt: skip
    """uint8 batch -> float, resized (to ``size``, default the test size), augmented, normalised model input (all batched on the device)."""
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


@torch.no_grad()
def evaluate(classifier: Classifier, loader: BatchLoader, num_classes: int) -> torch.Tensor:
    """Confusion matrix (true x predicted, int64 on CPU) of ``classifier`` over ``loader``, all ranks."""
    was_training = classifier.training
    classifier.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=loader.device)
    for images, labels in loader.batches(0):
        pred = classifier(to_float(images)).argmax(dim=1)
        cell = labels * num_classes + pred
        confusion.scatter_add_(0, cell, torch.ones_like(cell))  # not bincount: on CUDA it waits for the GPU
    confusion = dist.all_reduce_sum(confusion)
    classifier.train(was_training)
    return confusion.view(num_classes, num_classes).cpu()


def accuracy(confusion: torch.Tensor) -> float:
    """The fraction of a confusion matrix on its diagonal."""
    return confusion.diag().sum().item() / confusion.sum().item()


@contextmanager
def stop_flag(sigterm: bool) -> Iterator[dict[str, Any]]:
    """Turn the first Ctrl-C (and SIGTERM when ``sigterm``) into a flag the loop checks between
    steps, to checkpoint and stop there; a second signal aborts at once.

    SIGTERM is what ``timeout``, ``kill`` and job schedulers (Slurm, Kubernetes) send before they
    kill. Not under torchrun: torchelastic stops the other workers with SIGTERM when one fails and
    restarts them from the last checkpoint, and a checkpoint then would wait on the failed worker.
    """
    state: dict[str, Any] = {"interrupted": False, "signal": None}
    if not _in_main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["interrupted"]:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        state["interrupted"], state["signal"] = True, signum

    signals = [signal.SIGINT, signal.SIGTERM] if sigterm else [signal.SIGINT]
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stopped(stop: dict[str, Any]) -> str:
    return "interrupted" if stop["signal"] == signal.SIGINT else "terminated (SIGTERM)"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


# ----------------------------------------------------------------------------------------------
# The run


def _check_flags(recipe: str | Recipe | None, out: str | Path | None, resume: str | Path | None, force: bool,
                 checkpoint_every: int, init_from: str | None) -> None:  # fmt: skip
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, not {checkpoint_every}")
    for flag, value in (("--out", out), ("--resume", resume), ("--init-from", init_from)):
        if value is not None and not str(value).strip():  # '' was taken as "not given": --out '' wrote to runs/
            raise UsageError(f"{flag} is empty; give a path, or leave {flag} out")
    given = [flag for flag, on in (("--recipe", recipe is not None), ("--out", out is not None), ("--force", force),
                                   ("--init-from", init_from is not None)) if on]  # fmt: skip
    if resume is not None and given:
        raise UsageError(f"--resume continues the run in {resume}; drop {' and '.join(given)}")


def _run_dir_of(resume: str | Path) -> Path:
    """The run directory of ``--resume`` (a run directory or its checkpoint file)."""
    return Path(resume) if Path(resume).is_dir() else Path(resume).parent


def _resumed_run(resume: str | Path, overrides: dict[str, Any]) -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any]], Recipe]:
    """The checkpoint of the run to resume, and its recipe as trained (only ``device`` may change)."""
    aside = Path(resume) / PREVIOUS_RUN
    if aside.is_dir() and not (Path(resume) / CHECKPOINT_NAME).exists():
        raise UsageError(f"{resume} holds no checkpoint: a --force run was stopped before its first one; the run it was "
                         f"replacing is in {aside} (move its files back to resume it)")  # fmt: skip
    tensors, meta = read_checkpoint(resume)
    recipe = _resume_state(tensors, meta, resume)
    # a flag given with the value the run has is no change (as every other value is)
    changed = {k: v for k, v in overrides.items() if v is not None and k != "device" and v != getattr(recipe, k, _UNSET)}
    if changed:
        raise UsageError(f"--resume continues the run as it was; drop {', '.join('--' + k.replace('_', '-') for k in changed)}")
    return (tensors, meta), dataclasses.replace(recipe, device=overrides.get("device") or recipe.device)


def _corrupt_resume(path: str | Path, what: str) -> CheckpointError:
    """The one-line error for a checkpoint whose resume state (``what`` names the field) is damaged."""
    return CheckpointError(f"{resolve_checkpoint_path(path)} has corrupt resume metadata ({what}); it cannot be resumed, "
                           "though eval, predict and export may still use it")  # fmt: skip


def _wrong_numbers(values: Any, ranges: dict[str, tuple[float, float, bool]], name: str, may_be_none: tuple[str, ...] = ()) -> str | None:
    """The first value of the dict ``values`` that is not as ``ranges`` requires, or None.

    Args:
        values: a dict read from a checkpoint's metadata.
        ranges: key -> (lowest, highest, integer): each value must be a finite number (an integer
            where asked, never a bool) in [lowest, highest]; other keys are not read.
        name: ``values``' name in the metadata, for the message (``sums``, ``history[0]``).
        may_be_none: keys that may also be None (``test_acc`` of an epoch not tested).
    """
    if not isinstance(values, dict):
        return f"{name} is {repr(values)[:60]}, not an object"
    for key, (low, high, integer) in ranges.items():
        v = values.get(key)
        if v is None and key in may_be_none:
            continue
        kind = numbers.Integral if integer else numbers.Real
        # within the largest float, not isfinite: NaN fails it, and a huge JSON int (summed with floats later) makes isfinite raise
        if not (isinstance(v, kind) and not isinstance(v, bool) and low <= v <= high and abs(v) <= sys.float_info.max):
            bounds = "> 0" if low == _POSITIVE else f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            shown = repr(v)[:60] if key in values else "missing"
            return f"{name}.{key} is {shown}, not {'an integer' if integer else 'a number'} {bounds}"
    return None


def _resume_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Recipe:
    """The run's recipe as trained, once the state a resume reads (eval, predict and export read less) is whole:
    every metadata value of its type and range, every tensor of the dtype and shape the run restores it into.

    Args:
        tensors: the checkpoint's tensors (read_checkpoint checked the ``model.*`` ones, for every command).
        meta: its metadata.
        path: the run directory or checkpoint given to ``--resume``.
    """

    def corrupt(what: str) -> CheckpointError:
        return _corrupt_resume(path, what)

    fields = meta.get("recipe")
    core = {"name", "model", "dataset", "epochs", "batch_size", "lr", "seed", "device"}  # in every version's checkpoints
    if not isinstance(fields, dict) or not core <= set(fields) <= {f.name for f in dataclasses.fields(Recipe)}:
        raise corrupt("recipe")
    try:  # the recipe's own checks, as a new run's flags get: types, then ranges
        recipe = recipe_as_trained(fields, meta).validate()
    except UsageError as err:
        raise corrupt(f"recipe: {err}") from None
    position, history, sums, scaler = meta["position"], meta["history"], meta["sums"], meta.get("scaler")
    wrong = (_wrong_numbers(position, _POSITION_RANGES, "position") or _wrong_numbers(sums, _SUMS_RANGES, "sums")
             or (_wrong_numbers(scaler, _SCALER_RANGES, "scaler") if scaler is not None else None))  # fmt: skip
    if wrong:
        raise corrupt(wrong)
    if position["epoch"] > recipe.epochs:
        raise corrupt(f"position.epoch is {position['epoch']}, past the recipe's {recipe.epochs} epochs")
    if sums["correct"] > sums["count"] or (position["step"] > 0) != (sums["count"] > 0):  # mid-epoch, and only then, images were counted
        raise corrupt(f"sums {sums} do not fit position {position}")
    if not (isinstance(history, list) and len(history) == position["epoch"]):
        raise corrupt(f"history is not a list of the {position['epoch']} finished epochs")
    for i, row in enumerate(history):
        wrong = _wrong_numbers(row, _HISTORY_RANGES, f"history[{i}]", may_be_none=("test_acc",))
        if wrong or row["epoch"] != i + 1:
            raise corrupt(wrong or f"history[{i}].epoch is {row['epoch']}, not {i + 1}")
    # The optimizer and generator state, against the optimizer this recipe builds (shapes only: on the meta device).
    with torch.device("meta"):
        optimizer = make_optimizer(recipe, model_skeleton(meta), recipe.lr)
    expected = {**optimizer_state_spec(optimizer), "rng.cpu": (torch.uint8, tuple(torch.get_rng_state().shape))}
    if "rng.cuda" in tensors:  # written by a run on a GPU, restored on one
        expected["rng.cuda"] = (torch.uint8, (CUDA_RNG_BYTES,))
    state = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    if not any(k.startswith("optim.") for k in state) and (scaler is not None or position == {"epoch": 0, "step": 0}):
        # no step taken yet: a GradScaler (fp16) skips every step whose gradients overflowed, often the first ones
        expected = {k: v for k, v in expected.items() if not k.startswith("optim.")}
    wrong = tensor_mismatch(state, expected, "expected") or wrong_optimizer_groups(meta["optimizer"], optimizer)
    if wrong:
        raise corrupt(wrong)
    return recipe


def check_train_request(recipe: str | None, *, world_size: int, out: str | None, resume: str | None, force: bool,
                        checkpoint_every: int, init_from: str | None, **overrides: Any) -> None:  # fmt: skip
    """The checks :func:`train` makes of its arguments before it loads data, without its side effects.

    ``--nproc`` runs them once, in the launcher, so that a bad flag is one line before any worker
    starts instead of one line per worker (every worker makes the same checks).
    """
    _check_flags(recipe, out, resume, force, checkpoint_every, init_from)
    if resume is not None:
        check_not_in_use(_run_dir_of(resume))  # early; the worker's rank 0 takes the lock for real
        (_, meta), checked = _resumed_run(resume, overrides)
        dist.check_world_size(meta.get("world_size"), world_size, _run_dir_of(resume))
    else:
        checked = get_recipe(recipe or "fast", **overrides)
        if out:
            prepare_run_dir(out, checked.name, force)
        if init_from:
            from resnetlab.models.pretrained import weights_file

            weights_file(init_from)
    resolve_precision(checked.precision, resolve_device(checked.device))


def train(
    recipe: str | Recipe | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    checkpoint_every: int = 0,
    data_root: str | None = None,
    init_from: str | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> RunResult:
    """Train a model with a recipe; the Python twin of ``resnetlab train``.

    Args:
        recipe: a recipe name (``d2l``, ``fast``, ``best``) or a :class:`Recipe`; default ``fast``
            (none with ``resume``: a run continues with its own recipe).
        out: the run directory (default ``runs/<recipe>-<timestamp>``).
        resume: a run directory to continue where it stopped (no other overrides but ``device``).
        force: replace the run in ``out`` (kept aside until the new run's first checkpoint).
        checkpoint_every: also checkpoint every N steps (0: at epoch ends only).
        data_root: look for the dataset here first.
        init_from: torchvision/timm ResNet weights to start from.
        progress: show a progress bar (default: when stdout is a terminal).
        **overrides: recipe fields to change, e.g. ``epochs=2, batch_size=128``.
    """
    _check_flags(recipe, out, resume, force, checkpoint_every, init_from)  # before a torchelastic restart resumes --out
    resumed: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    restarted = dist.restarted_run(out) if resume is None else None  # torchelastic restarted this worker group
    if restarted == "resume":  # continue from the last checkpoint, as --resume would
        resume, overrides = out, {"device": overrides.get("device")}
    elif restarted == "restart":  # the failure came before the first checkpoint: start over
        force = True
    stamp = None
    if resume is not None:
        stamp = checkpoint_stamp(_run_dir_of(resume))  # before reading it: under the lock, create() checks no run rewrote it since
        resumed, recipe = _resumed_run(resume, overrides)
        run_dir = _run_dir_of(resume)
        data_root = data_root or resumed[1].get("data_root")
    else:
        recipe = recipe.validate() if isinstance(recipe, Recipe) else get_recipe(recipe or "fast", **overrides)
        run_dir = None  # chosen once the rank is known: only rank 0 touches the file system

    ctx = dist.setup(resolve_device(recipe.device))
    device = ctx.device
    if device.type == "cuda":  # fixed shapes: cuDNN times its kernels once and keeps the fastest (as timm's train.py)
        torch.backends.cudnn.benchmark = True
    if resumed:
        dist.check_world_size(resumed[1].get("world_size"), ctx.world_size, run_dir)
    if run_dir is None:
        run_dir = prepare_run_dir(out, recipe.name, force) if ctx.is_main else Path(out or ".")
        run_dir = Path(dist.broadcast_object(str(run_dir)))
    precision = resolve_precision(recipe.precision, device)

    # Data: whole splits as uint8 tensors on the device.
    train_split, test_split = load_dataset(recipe.dataset, root=data_root)
    require_test_images(test_split, recipe.dataset)
    if recipe.subset:
        train_split = seeded_subset(train_split, recipe.subset, recipe.seed)
    if resumed:  # an image folder may have changed since: the schedule and the classifier depend on it
        then = (resumed[1]["classes"], resumed[1].get("train_images", len(train_split)))
        if then != (train_split.classes, len(train_split)):
            raise UsageError(f"{recipe.dataset} changed since the checkpoint ({len(then[0])} classes and {then[1]} training images "
                             f"then, {len(train_split.classes)} and {len(train_split)} now); resume with the same data, "
                             "or start a new run")  # fmt: skip
    c, h, w = train_split.images.shape[1:]
    size = recipe.resize or None
    if recipe.normalize:
        mean, std = channel_stats(train_split.images)  # a resumed run restores its saved values
    else:
        mean, std = [0.0] * c, [1.0] * c
    preprocess = Preprocess(size, mean, std).to(device)
    batch_size = recipe.batch_size

    # Model, optimizer, schedule; the batches once the model's smallest map is known.
    torch.manual_seed(recipe.seed)
    net = create_model(recipe.model, num_classes=len(train_split.classes), in_chans=c, **recipe.model_options())
    early = sorted(set(recipe.early_sizes()))  # progressive resizing
    if early and not size and h != w:
        raise UsageError(f"progressive sizes are square and these images are {h}x{w}; set --resize too (the square side they are tested at)")
    sizes = [(size or min(h, w), "--resize {}"), *((e, "--progressive-sizes sizes of {}") for e in early)]
    smallest_norm_map = min(check_train_size(net, side, c, recipe.model, batch_size, fix) for side, fix in sizes)

    # Under torchrun every rank needs the same count of full batches (DDP). In one process a final
    # batch of one image is dropped only where a BatchNorm sees a 1x1 map (it cannot normalise one
    # value per channel); every other final batch is kept: published figures depend on the batches.
    drop_last = ctx.world_size > 1 or (len(train_split) % batch_size == 1 and smallest_norm_map == 1)
    train_loader = BatchLoader(train_split, batch_size, shuffle=True, seed=recipe.seed, drop_last=drop_last,
                               device=device, rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
    test_loader = BatchLoader(test_split, recipe.eval_batch_size, device=device, rank=ctx.rank, world_size=ctx.world_size)
    if len(train_loader) == 0:
        raise UsageError(f"batch size {batch_size} x {ctx.world_size} processes is larger than the {len(train_split)} training images")

    if recipe.init == "xavier":
        xavier_init(net)
    if init_from and not resumed:
        from resnetlab.models.pretrained import load_pretrained

        load_pretrained(net, init_from)
    if ctx.world_size > 1 and recipe.sync_bn:
        net = dist.convert_sync_batchnorm(net, device)
    net.to(device)
    if recipe.channels_last:
        net.to(memory_format=torch.channels_last)
    lr = recipe.lr * (ctx.world_size if recipe.scale_lr else 1)
    optimizer = make_optimizer(recipe, net, lr)
    steps_per_epoch = len(train_loader)
    total_steps = recipe.epochs * steps_per_epoch
    classifier = Classifier(net, preprocess, train_split.classes, tta=recipe.tta, precision=precision,
                            input_shape=(c, h, w), channels_last=recipe.channels_last)  # fmt: skip
    model = dist.wrap(net, ctx)
    if recipe.compile:
        model = torch.compile(model)
    amp_dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    # Position and running sums; a resumed run takes them from its checkpoint.
    epoch, start_step = 0, 0
    sums = dict(EMPTY_SUMS)
    history: list[dict[str, Any]] = []
    if resumed:
        tensors, meta = resumed
        _restore(tensors, meta, net, optimizer, scaler, preprocess, device)
        epoch, start_step = meta["position"]["epoch"], meta["position"]["step"]
        sums, history = dist.share_of_sums(meta["sums"], ctx), meta["history"]
        if start_step > steps_per_epoch:  # known only now: an epoch's steps depend on the data and the batch size
            raise _corrupt_resume(run_dir, f"position.step is {start_step}, past the {steps_per_epoch} steps of an epoch")
    dist.check_agree((epoch, start_step, len(history)), "where the run stands (epoch, step, finished epochs)")
    meta_static = {
        WARMUP_EVERY_SCHEDULE: True,
        "train_images": len(train_split),  # a resume checks the data is the same
        "model": {"name": net_name(net), "options": net_options(net)},
        "classes": train_split.classes,
        "dataset": recipe.dataset,
        "data_root": data_root,
        "input_shape": [c, h, w],
        "preprocessing": preprocess.config(),
        "tta": recipe.tta,
        "train_precision": precision,  # provenance: inference computes in fp32 unless asked otherwise
        "channels_last": recipe.channels_last,
        "eval_batch_size": recipe.eval_batch_size,
        "recipe": dataclasses.asdict(recipe),
        "world_size": ctx.world_size,
    }
    files = RunFiles(run_dir, new=resumed is None, unique=not out and resumed is None, force=force,
                     resumed_stamp=stamp)  # rank 0 creates (and locks) the directory below  # fmt: skip

    def checkpoint(at_epoch: int, at_step: int) -> None:
        """Save everything needed to continue at (at_epoch, at_step); rank 0 writes."""
        if stop["interrupted"] and replacing and not files.checkpointed:  # stopped (in a step, a test pass...) while an old run waits aside: it comes back
            raise TrainingInterrupted(f"{_stopped(stop)} before this run's first checkpoint; {run_dir} holds the run it was "
                                      "replacing again", stop["signal"])  # fmt: skip
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise NonFiniteLoss(f"weights became non-finite at epoch {at_epoch + 1}, step {at_step}; checkpoint not written")
        saved_sums = dist.global_sums(sums, device)  # the epoch so far over all ranks
        if ctx.is_main:
            save_checkpoint(run_dir / CHECKPOINT_NAME, _state_tensors(net, optimizer, device),
                            {**meta_static, "position": {"epoch": at_epoch, "step": at_step}, "sums": saved_sums,
                             "history": history, "optimizer": _optimizer_groups(optimizer),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None})  # fmt: skip
        files.mark_checkpointed()
        dist.barrier()

    def write_history() -> None:
        """metrics.jsonl/.csv and curves.png from the finished epochs (rank 0)."""
        write_metrics(run_dir, history)
        if history:
            plot_curves(run_dir / "curves.png", history, f"{recipe.model} on {recipe.dataset} ({recipe.name})")

    confusion = None
    show_bar = ctx.is_main and (progress if progress is not None else sys.stdout.isatty())
    with stop_flag(sigterm=ctx.world_size == 1 and dist.job_id() is None) as stop, files:  # a failure before the first checkpoint removes what this run wrote
        if ctx.is_main:  # only now: bad data or a bad model size leaves no empty run directory, nor --force a deleted run
            run_dir = files.create()
            procs = f" x {ctx.world_size} processes" if ctx.world_size > 1 else ""
            layout = ", channels_last" if recipe.channels_last else ""
            print(f"training on {describe(device)}{procs}: {precision}{' autocast' if amp_dtype else ''}{layout}", flush=True)
            warn_if_emulated(precision, device)
            if resumed:
                finished = epoch >= recipe.epochs
                print(f"{run_dir} finished its {recipe.epochs} epochs; evaluating it again" if finished
                      else f"resuming {run_dir} at epoch {epoch + 1}, step {start_step}", flush=True)  # fmt: skip
                # a kill between a checkpoint and the metrics written after it left them one epoch behind
                write_history()
            if not resumed or not (run_dir / "config.json").exists():  # a resume keeps the command and commit that started the run
                write_json(run_dir / "config.json", {"recipe": dataclasses.asdict(recipe), "precision": precision,
                                                     "cpu_class": cpu_class() if device.type == "cpu" else None,
                                                     "world_size": ctx.world_size, "global_batch_size": batch_size * ctx.world_size,
                                                     "lr_applied": lr, "seed": recipe.seed, "torchelastic_run_id": dist.job_id(),
                                                     **environment(device)})  # fmt: skip
        # a default name may have become NAME-2 on rank 0, which alone knows of an old run set aside
        run_dir, replacing = dist.broadcast_object((run_dir, files.replacing))  # an old run waits aside (--force)
        while epoch < recipe.epochs:
            model.train()
            train_size = recipe.train_size(epoch)  # the test size, or smaller in early epochs (progressive resizing)
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{recipe.epochs}", show_bar)
            if bar is not None:
                bar.update(start_step)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            count, step_clock = 0, dist.StepClock(device)
            t_epoch = time.perf_counter()
            for step, (images, labels) in enumerate(train_loader.batches(epoch, start_step), start=start_step):
                global_step = epoch * steps_per_epoch + step
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(recipe, global_step, total_steps)
                x = train_inputs(images, recipe, preprocess, augment_generator(recipe.seed, epoch, step, ctx.rank), train_size)
                step_clock.start()
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = model(x)
                    loss = loss_fn(logits.float(), labels)
                if device.type == "cpu" or step % 20 == 0:  # a host sync; every step is free on the CPU
                    if not torch.isfinite(loss).item():
                        kept = (f"the last good checkpoint in {run_dir} is kept" if files.checkpointed
                                else "no checkpoint was written yet")
                        raise NonFiniteLoss(
                            f"loss is {loss.item()} at epoch {epoch + 1}, step {step} (lr {optimizer.param_groups[0]['lr']:.4g}); "
                            f"{kept}. Lower --lr" + (" or use --precision fp32" if amp_dtype is not None else "")
                        )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step_clock.stop()
                loss_sum += loss.detach().double() * len(labels)
                correct += (logits.argmax(dim=1) == labels).sum()
                count += len(labels)
                dist.record_step_loss(epoch, step, loss, len(labels))
                if bar is not None and (step % 10 == 0 or step == steps_per_epoch - 1):
                    done = sums["count"] + count
                    elapsed = sums["seconds"] + time.perf_counter() - t_epoch
                    bar.set_postfix(loss=f"{(sums['loss'] + loss_sum.item()) / done:.3f}",
                                    acc=f"{(sums['correct'] + correct.item()) / done:.3f}",
                                    img_s=f"{done * ctx.world_size / max(elapsed, 1e-9):.0f}")  # fmt: skip
                if bar is not None:
                    bar.update(1)
                if stop["interrupted"] or (checkpoint_every and (global_step + 1) % checkpoint_every == 0):
                    if stop["interrupted"] and bar is not None:
                        bar.close()
                    compute_seconds = step_clock.take()  # first: it waits for the queued steps
                    _fold(sums, loss_sum, correct, count, time.perf_counter() - t_epoch, compute_seconds)
                    loss_sum.zero_(), correct.zero_()
                    count, t_epoch = 0, time.perf_counter()
                    checkpoint(epoch, step + 1)
                    if stop["interrupted"]:
                        raise TrainingInterrupted(
                            f"{_stopped(stop)} at epoch {epoch + 1}, step {step + 1}; checkpoint saved, "
                            f"continue with: resnetlab train --resume {run_dir}"
                            + (f" --nproc {ctx.world_size}" if ctx.world_size > 1 else ""),
                            stop["signal"],
                        )
            if bar is not None:
                bar.close()
            compute_seconds = step_clock.take()
            _fold(sums, loss_sum, correct, count, time.perf_counter() - t_epoch, compute_seconds)

            # End of epoch: metrics over all ranks, test accuracy in eval mode on the full test split
            # (every eval_every-th epoch and the last; None in the other rows).
            totals = dist.all_reduce_sum(torch.tensor([sums["loss"], sums["correct"], sums["count"]], dtype=torch.float64, device=device)).tolist()
            dist.broadcast_buffers(net)  # every rank evaluates rank 0's BatchNorm statistics, as checkpointed
            test_acc = None
            final = epoch + 1 == recipe.epochs
            if final or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0):
                # The last test pass runs in fp32, as `resnetlab eval` does by default on any machine:
                # the accuracy a run reports is the one its checkpoint reproduces. Earlier ones keep
                # the training precision, for speed.
                classifier.precision = "fp32" if final else precision
                confusion = evaluate(classifier, test_loader, len(train_split.classes))
                test_acc = accuracy(confusion)
            row = {
                "epoch": epoch + 1,
                "train_loss": totals[0] / totals[2],
                "train_acc": totals[1] / totals[2],
                "test_acc": test_acc,
                "images_per_s": totals[2] / max(sums["seconds"], 1e-9),
                "compute_images_per_s": totals[2] / max(sums["compute_seconds"], 1e-9),
                "seconds": sums["seconds"],
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(row)
            epoch, start_step = epoch + 1, 0
            sums = dict(EMPTY_SUMS)
            checkpoint(epoch, 0)
            if ctx.is_main:
                write_history()
                if not show_bar:
                    tested = f"test acc {test_acc:.3f}" if test_acc is not None else "test acc not measured (--eval-every)"
                    print(f"epoch {row['epoch']}/{recipe.epochs}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
                          f"{tested}, {row['images_per_s']:.1f} examples/sec, {row['seconds']:.1f} s", flush=True)  # fmt: skip

    if confusion is None:  # resumed a finished run: nothing left to train, evaluate once more (fp32, as at its end)
        classifier.precision = "fp32"
        confusion = evaluate(classifier, test_loader, len(train_split.classes))
    last = history[-1]
    seen = sum(r["images_per_s"] * r["seconds"] for r in history)
    result = RunResult(
        run_dir=run_dir,
        train_loss=last["train_loss"],
        train_acc=last["train_acc"],
        test_acc=accuracy(confusion),  # measured now (a finished run resumed: again)
        examples_per_sec=seen / sum(r["seconds"] for r in history),
        compute_examples_per_sec=seen / sum(r["images_per_s"] * r["seconds"] / r["compute_images_per_s"] for r in history),
        device=str(device),
        history=history,
        confusion=confusion,
    )
    if ctx.is_main:
        plot_confusion(run_dir / "confusion.png", confusion, train_split.classes, f"{recipe.model}: test acc {result.test_acc:.3f}")
        # The chapter's two closing lines, then its compute-only measure for comparison.
        print(f"loss {result.train_loss:.3f}, train acc {result.train_acc:.3f}, test acc {result.test_acc:.3f}")
        print(f"{result.examples_per_sec:.1f} examples/sec on {device}")
        print(f"({result.compute_examples_per_sec:.1f} examples/sec in training steps only, the chapter's measure; "
              f"run directory {run_dir})", flush=True)  # fmt: skip
    files.release()  # after the run's last file: another run may now use the directory
    dist.teardown(ctx)
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoint plumbing


def net_name(net: nn.Module) -> str:
    return getattr(net, "name")


def net_options(net: nn.Module) -> dict[str, Any]:
    return dict(getattr(net, "options"))


def _fold(sums: dict[str, Any], loss_sum: torch.Tensor, correct: torch.Tensor, count: int, seconds: float, compute: float) -> None:
    sums["loss"] += loss_sum.item()
    sums["correct"] += int(correct.item())
    sums["count"] += count
    sums["seconds"] += seconds
    sums["compute_seconds"] += compute


def _state_tensors(net: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]


def _restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], net: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, preprocess: Preprocess, device: torch.device) -> None:  # fmt: skip
    load_weights(net, prefixed(tensors, "model."), "checkpoint weights do not fit the model")
    preprocess.mean.copy_(torch.tensor(meta["preprocessing"]["mean"]).view_as(preprocess.mean))
    preprocess.std.copy_(torch.tensor(meta["preprocessing"]["std"]).view_as(preprocess.std))
    state: dict[int, dict[str, Any]] = {}
    for key, value in prefixed(tensors, "optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.to(device)
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["optimizer"]):
        group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
