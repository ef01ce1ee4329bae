"""Resolving a training request: the flags, a ``--resume`` and its checkpoint, torchelastic's restart.

Everything here runs before a process group or data exist, so that a bad request is one line.
``check_train_request`` makes the same checks once in the ``--nproc`` launcher.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resnetlab.checkpoint import (
    CUDA_RNG_BYTES,
    TensorSpec,
    model_skeleton,
    optimizer_state_spec,
    read_checkpoint,
    resolve_checkpoint_path,
    tensor_mismatch,
    wrong_optimizer_groups,
)
from resnetlab.device import resolve_device, resolve_precision
from resnetlab.errors import CheckpointError, UsageError
from resnetlab.fileio import CHECKPOINT_NAME, PREVIOUS_RUN
from resnetlab.train import elastic
from resnetlab.train.lookahead import Lookahead
from resnetlab.train.recipes import Recipe, get_recipe, recipe_as_trained
from resnetlab.train.rundir import check_not_in_use, checkpoint_stamp, prepare_run_dir
from resnetlab.train.state import EMPTY_INTERVAL, EMPTY_SUMS
from resnetlab.train.step import make_optimizer

__all__ = ["Request", "check_train_request", "resolve_request", "corrupt_resume"]

_UNSET = object()  # no recipe field of that name

# The numbers a resume reads from a checkpoint's metadata: key -> (lowest, highest, integer); none NaN or inf.
_POSITIVE = math.ulp(0.0)  # > 0: the run's closing figures divide by these

_POSITION_RANGES = {"epoch": (0, math.inf, True), "step": (0, math.inf, True)}

_SUMS_RANGES = {k: (0.0, math.inf, isinstance(v, int)) for k, v in EMPTY_SUMS.items()}
_INTERVAL_RANGES = {k: (0.0, math.inf, isinstance(v, int)) for k, v in EMPTY_INTERVAL.items()}

_CURVE_RANGES = {
    "epoch": (1, math.inf, True),
    "step": (1, math.inf, True),
    "epoch_fraction": (_POSITIVE, 1.0, False),
    "train_loss": (0.0, math.inf, False),
    "train_acc": (0.0, 1.0, False),
    "lr": (0.0, math.inf, False),
}  # loop.add_row's, each

_HISTORY_RANGES = {
    "epoch": (1, math.inf, True),
    "train_loss": (0.0, math.inf, False),
    "train_acc": (0.0, 1.0, False),
    "test_acc": (0.0, 1.0, False),
    "images_per_s": (_POSITIVE, math.inf, False),
    "compute_images_per_s": (_POSITIVE, math.inf, False),
    "seconds": (_POSITIVE, math.inf, False),
    "lr": (0.0, math.inf, False),
}  # rundir.METRIC_FIELDS, each

_SCALER_RANGES = {
    "scale": (_POSITIVE, math.inf, False),
    "growth_factor": (_POSITIVE, math.inf, False),
    "backoff_factor": (_POSITIVE, math.inf, False),
    "growth_interval": (1, math.inf, True),
    "_growth_tracker": (0, math.inf, True),
}  # GradScaler.state_dict() (fp16 runs)


def _check_flags(
    recipe: str | Recipe | None,
    out: str | Path | None,
    resume: str | Path | None,
    force: bool,
    checkpoint_every: int,
    init_from: str | None,
) -> None:
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, not {checkpoint_every}")
    for flag, value in (("--out", out), ("--resume", resume), ("--init-from", init_from)):
        if value is not None and not str(value).strip():  # '' was taken as "not given": --out '' wrote to runs/
            raise UsageError(f"{flag} is empty; give a path, or leave {flag} out")
    given = [
        flag
        for flag, on in (
            ("--recipe", recipe is not None),
            ("--out", out is not None),
            ("--force", force),
            ("--init-from", init_from is not None),
        )
        if on
    ]
    if resume is not None and given:
        raise UsageError(f"--resume continues the run in {resume}; drop {' and '.join(given)}")


def _initialised_from(recipe: Recipe, init_from: str | None, whiten_asked: bool) -> Recipe:
    """The recipe a new run trains when it starts from ``init_from``.

    Both set the first convolution: pretrained weights replace a recipe's whitened stem (the
    weights asked for win, as they replace the rest of its initialisation), and asking for both
    (``--whiten-stem``, or a Recipe given whole) is refused.
    """
    if init_from is None or not recipe.whiten_stem:
        return recipe
    if whiten_asked:
        raise UsageError("--init-from and --whiten-stem both set the first convolution; drop one of them")
    return dataclasses.replace(recipe, whiten_stem=False)


def _run_dir_of(resume: str | Path) -> Path:
    """The run directory of ``--resume`` (a run directory or its checkpoint file)."""
    return Path(resume) if Path(resume).is_dir() else Path(resume).parent


def _resumed_run(
    resume: str | Path, overrides: dict[str, Any]
) -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any]], Recipe]:
    """The checkpoint of the run to resume, and its recipe as trained (only ``device`` may change)."""
    aside = Path(resume) / PREVIOUS_RUN
    if aside.is_dir() and not (Path(resume) / CHECKPOINT_NAME).exists():
        raise UsageError(
            f"{resume} holds no checkpoint: a --force run was stopped before its first one; the run it was "
            f"replacing is in {aside} (move its files back to resume it)"
        )
    tensors, meta = read_checkpoint(resume)
    recipe = _resume_state(tensors, meta, resume)
    # a flag given with the value the run has is no change (as every other value is)
    changed = {
        k: v for k, v in overrides.items() if v is not None and k != "device" and v != getattr(recipe, k, _UNSET)
    }
    if changed:
        raise UsageError(
            f"--resume continues the run as it was; drop {', '.join('--' + k.replace('_', '-') for k in changed)}"
        )
    return (tensors, meta), dataclasses.replace(recipe, device=overrides.get("device") or recipe.device)


def corrupt_resume(path: str | Path, what: str) -> CheckpointError:
    """The one-line error for a checkpoint whose resume state (``what`` names the field) is damaged."""
    return CheckpointError(
        f"{resolve_checkpoint_path(path)} has corrupt resume metadata ({what}); it cannot be resumed, "
        "though eval, predict and export may still use it"
    )


def _wrong_numbers(
    values: Any, ranges: dict[str, tuple[float, float, bool]], name: str, may_be_none: tuple[str, ...] = ()
) -> str | None:
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
        # within the largest float, not isfinite: NaN fails it, and a huge JSON int (summed with floats later)
        # makes isfinite raise
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
        return corrupt_resume(path, what)

    fields = meta.get("recipe")
    core = {
        "name",
        "model",
        "dataset",
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "device",
    }  # in every version's checkpoints
    if not isinstance(fields, dict) or not core <= set(fields) <= {f.name for f in dataclasses.fields(Recipe)}:
        raise corrupt("recipe")
    try:  # the recipe's own checks, as a new run's flags get: types, then ranges
        recipe = recipe_as_trained(fields, meta).validate()
    except UsageError as err:
        raise corrupt(f"recipe: {err}") from None
    position, history, sums, scaler = meta["position"], meta["history"], meta["sums"], meta.get("scaler")
    # checkpoints from before the curve had rows have neither
    interval, curve = meta.get("interval", dict(EMPTY_INTERVAL)), meta.get("curve", [])
    wrong = (
        _wrong_numbers(position, _POSITION_RANGES, "position")
        or _wrong_numbers(sums, _SUMS_RANGES, "sums")
        or _wrong_numbers(interval, _INTERVAL_RANGES, "interval")
        or (_wrong_numbers(scaler, _SCALER_RANGES, "scaler") if scaler is not None else None)
    )
    if wrong:
        raise corrupt(wrong)
    if position["epoch"] > recipe.epochs:
        raise corrupt(f"position.epoch is {position['epoch']}, past the recipe's {recipe.epochs} epochs")
    # mid-epoch, and only then, images were counted
    counted = sums["count"] + interval["count"]
    if (
        sums["correct"] > sums["count"]
        or interval["correct"] > interval["count"]
        or (position["step"] > 0) != (counted > 0)
    ):
        raise corrupt(f"sums {sums} and interval {interval} do not fit position {position}")
    if not isinstance(curve, list):
        raise corrupt("curve is not a list of rows")
    for i, row in enumerate(curve):
        wrong = _wrong_numbers(row, _CURVE_RANGES, f"curve[{i}]")
        if wrong or row["epoch"] > position["epoch"] + 1:
            raise corrupt(wrong or f"curve[{i}].epoch is {row['epoch']}, past position {position}")
    if not (isinstance(history, list) and len(history) == position["epoch"]):
        raise corrupt(f"history is not a list of the {position['epoch']} finished epochs")
    for i, row in enumerate(history):
        wrong = _wrong_numbers(row, _HISTORY_RANGES, f"history[{i}]", may_be_none=("test_acc",))
        if wrong or row["epoch"] != i + 1:
            raise corrupt(wrong or f"history[{i}].epoch is {row['epoch']}, not {i + 1}")
    optimizer, expected = _state_spec(recipe, meta, position, tensors)
    state = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    wrong = tensor_mismatch(state, expected, "expected") or wrong_optimizer_groups(meta["optimizer"], optimizer)
    if wrong:
        raise corrupt(wrong)
    return recipe


def _state_spec(
    recipe: Recipe, meta: dict[str, Any], position: dict[str, int], tensors: dict[str, torch.Tensor]
) -> tuple[torch.optim.Optimizer, dict[str, TensorSpec]]:
    """The optimizer this recipe builds (on the meta device) and the dtype and shape of every tensor of the
    state a resume restores beside the weights: optimizer, generators, the lookahead's slow copy."""
    with torch.device("meta"):
        skeleton = model_skeleton(meta)
        optimizer = make_optimizer(recipe, skeleton, recipe.lr)
    expected = {**optimizer_state_spec(optimizer), "rng.cpu": (torch.uint8, tuple(torch.get_rng_state().shape))}
    if recipe.lookahead:
        expected.update({f"lookahead.{k}": (v.dtype, tuple(v.shape)) for k, v in Lookahead(skeleton).slow.items()})
    if "rng.cuda" in tensors:  # written by a run on a GPU, restored on one
        expected["rng.cuda"] = (torch.uint8, (CUDA_RNG_BYTES,))
    no_step_yet = meta.get("scaler") is not None or position == {"epoch": 0, "step": 0}
    if not any(k.startswith("optim.") for k in tensors) and no_step_yet:
        # no step taken yet: a GradScaler (fp16) skips every step whose gradients overflowed, often the first ones
        expected = {k: v for k, v in expected.items() if not k.startswith("optim.")}
    return optimizer, expected


def check_train_request(
    recipe: str | None,
    *,
    world_size: int,
    out: str | None,
    resume: str | None,
    force: bool,
    checkpoint_every: int,
    init_from: str | None,
    **overrides: Any,
) -> None:
    """The checks :func:`train` makes of its arguments before it loads data, without its side effects.

    ``--nproc`` runs them once, in the launcher, so that a bad flag is one line before any worker
    starts instead of one line per worker (every worker makes the same checks).
    """
    _check_flags(recipe, out, resume, force, checkpoint_every, init_from)
    if resume is not None:
        check_not_in_use(_run_dir_of(resume))  # early; the worker's rank 0 takes the lock for real
        (_, meta), checked = _resumed_run(resume, overrides)
        elastic.check_world_size(meta.get("world_size"), world_size, _run_dir_of(resume))
    else:
        checked = _initialised_from(
            get_recipe(recipe or "fast", **overrides), init_from, bool(overrides.get("whiten_stem"))
        )
        if out:
            prepare_run_dir(out, checked.name, force)
        if init_from:
            from resnetlab.models.pretrained import weights_file

            weights_file(init_from)
    resolve_precision(checked.precision, resolve_device(checked.device))


@dataclass
class Request:
    """A training request once resolved: the recipe, and where the run stands.

    Args:
        recipe: the recipe to train (a resumed run's own).
        out: ``--out`` as given (None: a default name).
        force: replace the run in ``out``.
        resumed: the checkpoint (tensors, metadata) a resumed run continues from, validated.
        run_dir: a resumed run's directory (None for a new run: rank 0 chooses it).
        stamp: the resumed checkpoint's identity when it was read (the lock checks no run rewrote it since).
        data_root: where to look for the data first.
    """

    recipe: Recipe
    out: str | Path | None
    force: bool
    resumed: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    run_dir: Path | None
    stamp: tuple[int, int, int] | None
    data_root: str | None


def resolve_request(
    recipe: str | Recipe | None,
    *,
    out: str | Path | None,
    resume: str | Path | None,
    force: bool,
    checkpoint_every: int,
    data_root: str | None,
    init_from: str | None,
    overrides: dict[str, Any],
) -> Request:
    """The flags checked, a torchelastic restart turned into a resume (or a fresh start), a resume read and validated.

    Args: as :func:`resnetlab.train.train`'s.
    """
    _check_flags(recipe, out, resume, force, checkpoint_every, init_from)  # before a torchelastic restart resumes --out
    restarted = elastic.restarted_run(out) if resume is None else None  # torchelastic restarted this worker group
    if restarted == "resume":  # continue from the last checkpoint, as --resume would
        resume, overrides = out, {"device": overrides.get("device")}
    elif restarted == "restart":  # the failure came before the first checkpoint: start over
        force = True
    if resume is None:
        asked = isinstance(recipe, Recipe) or bool(overrides.get("whiten_stem"))
        recipe = recipe.validate() if isinstance(recipe, Recipe) else get_recipe(recipe or "fast", **overrides)
        recipe = _initialised_from(recipe, init_from, asked)
        return Request(recipe, out, force, None, None, None, data_root)  # rank 0 chooses the directory
    stamp = checkpoint_stamp(
        _run_dir_of(resume)
    )  # before reading it: under the lock, create() checks no run rewrote it since
    resumed, recipe = _resumed_run(resume, overrides)
    return Request(recipe, out, force, resumed, _run_dir_of(resume), stamp, data_root or resumed[1].get("data_root"))
