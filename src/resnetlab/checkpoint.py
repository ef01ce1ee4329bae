"""Checkpoints: safetensors tensors plus JSON metadata, written atomically, never unpickled.

One file, ``last.safetensors``, holds everything needed to use or resume a run:

* tensors ``model.*`` (the network's state dict), ``optim.<param>.<key>`` (optimizer state),
  ``rng.cpu`` / ``rng.cuda`` (generator states);
* metadata key ``resnetlab``: JSON with the model name and options, the classes, the
  preprocessing, the resolved recipe, the position (epoch, step), the running sums of the current
  epoch, the finished epochs' metrics, the optimizer's param groups and the scheduler's state.

Writing goes to a temporary file in the same directory, is fsynced, then renamed over the old
file, so a crash at any moment leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import CheckpointError, UsageError
from resnetlab.fileio import CHECKPOINT_NAME, PREVIOUS_RUN, fsync_dir, is_torch_save, read_head, umask_mode
from resnetlab.models.pretrained import non_finite

FORMAT_VERSION = 1
# metadata every checkpoint written by training holds; using or resuming one reads them all
_META_KEYS = (
    "model",
    "classes",
    "input_shape",
    "preprocessing",
    "dataset",
    "recipe",
    "position",
    "sums",
    "history",
    "optimizer",
)
# torch.cuda.get_rng_state(): a Philox seed and offset of 8 bytes each (CUDAGeneratorImpl::get_state); the CPU's
# length is asked of torch.get_rng_state() itself
CUDA_RNG_BYTES = 16
# how torch runs an optimizer's update, not what it computes: a resume builds its own
OPTIMIZER_KERNEL_FLAGS = ("foreach", "fused")
# the largest test-time shift (Recipe.tta_translate): a few pixels, as the training crops move an image
MAX_TTA_TRANSLATE = 8
TensorSpec = tuple[torch.dtype, tuple[int, ...]]  # what a stored tensor must be: its dtype and shape


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask_mode(tmp)  # run files are shared (eval by a teammate), like any file a program writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write ``tensors`` and the JSON ``meta`` as one safetensors file."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format_version": FORMAT_VERSION, **meta}
    atomic_write_bytes(Path(path), save(flat, metadata={"resnetlab": json.dumps(meta)}))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file (with clear errors)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        aside = p.parent / PREVIOUS_RUN
        if aside.is_dir():  # as `train --resume` says: "no checkpoint" alone hid the old run waiting there
            raise CheckpointError(
                f"no checkpoint at {p}: a --force run was stopped before its first one; the run it was "
                f"replacing is in {aside} (give that folder, or move its files back)"
            )
        raise CheckpointError(f"no checkpoint at {p}; give a run directory or its {CHECKPOINT_NAME}")
    if not p.is_file():  # opening a FIFO waits for a writer, maybe forever
        raise CheckpointError(
            f"{p} is not a regular file (a directory, FIFO or device); give a run directory or its {CHECKPOINT_NAME}"
        )
    return p


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a resnetlab checkpoint -> (tensors on CPU, metadata). Refuses pickles."""
    p = resolve_checkpoint_path(path)
    head = read_head(p, "another checkpoint")
    if is_torch_save(head):
        raise CheckpointError(
            f"{p} is a pickle/torch.save file; resnetlab never unpickles (it can run code). "
            "Use a resnetlab last.safetensors, or resnetlab.load_pretrained for torchvision/timm weights"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("resnetlab")
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        if len(head) > 8 and head[8:9] != b"{":  # not safetensors at all: an image, an ONNX export, a CSV...
            hint = "; an ONNX export runs with `resnetlab predict --onnx`" if p.suffix.lower() == ".onnx" else ""
            raise CheckpointError(
                f"{p} is not a resnetlab checkpoint (not a safetensors file); give a run directory or "
                f"its {CHECKPOINT_NAME}{hint}"
            ) from None
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint ({err}); it may be truncated") from None
    if raw_meta is None:
        raise CheckpointError(
            f"{p} is a safetensors file without resnetlab metadata; for bare weights use load_pretrained"
        )
    if non_finite(prefixed(tensors, "model.")):  # never saved: training checks the weights before it writes
        raise CheckpointError(f"{p} holds non-finite (NaN or inf) weights; it is damaged, use another checkpoint")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{p} has corrupt resnetlab metadata ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p} has corrupt resnetlab metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format {meta.get('format_version')}; this resnetlab reads {FORMAT_VERSION}"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    spec = meta.get("model")
    if missing or not (
        isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("options"), dict)
    ):
        what = f"no {', '.join(missing)}" if missing else f"model is {spec!r}, not a name and options"
        raise CheckpointError(
            f"{p} has incomplete resnetlab metadata ({what}); it is damaged or not from `resnetlab train`"
        )
    wrong = _wrong_meta(meta)
    if wrong:
        raise CheckpointError(f"{p} has corrupt resnetlab metadata ({wrong}); it is damaged or was edited by hand")
    try:
        skeleton = model_skeleton(meta)
    except UsageError as err:  # an unknown model or option: create_model's own words, with the file's name
        raise CheckpointError(
            f"{p} has corrupt resnetlab metadata (model: {err}); it is damaged or was edited by hand"
        ) from None
    check_weights(
        skeleton,
        prefixed(tensors, "model."),
        f"{p}: the weights do not fit the {spec['name']} {spec['options']} its metadata describes",
    )
    return tensors, meta


def model_skeleton(meta: dict[str, Any]) -> nn.Module:
    """The network ``meta`` describes, on the meta device: its state's dtypes and shapes, no memory.

    Args:
        meta: a checkpoint's metadata (its ``model`` name and options).
    """
    from resnetlab.models import create_model

    with torch.device("meta"):
        return create_model(meta["model"]["name"], **meta["model"]["options"])


def tensor_mismatch(found: dict[str, torch.Tensor], expected: dict[str, TensorSpec], holder: str) -> str | None:
    """The first way ``found`` differs from ``expected``, or None.

    Args:
        found: tensors read from a checkpoint.
        expected: name -> (dtype, shape) of every tensor that must be there, and of no other.
        holder: where the expected dtype or shape comes from, for the message (``in the model``).

    A tensor of another dtype is a difference, never cast: int8 weights loaded into a float model
    evaluated at chance, and an fp16 optimizer state resumed silently.
    """
    for k, (dtype, shape) in expected.items():
        t = found.get(k)
        if t is not None and (t.dtype, tuple(t.shape)) != (dtype, shape):
            ours, theirs = (str(t.dtype), str(dtype)) if t.dtype != dtype else (tuple(t.shape), shape)
            return (
                f"{k} is {str(ours).removeprefix('torch.')} in the file, {str(theirs).removeprefix('torch.')} {holder}"
            )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else None


def optimizer_state_spec(optimizer: torch.optim.Optimizer) -> dict[str, TensorSpec]:
    """``optim.<index>.<key>`` -> (dtype, shape) of the state ``optimizer`` holds after a step.

    Keys, dtypes and shapes are as a checkpoint stores them.

    Args:
        optimizer: the optimizer a resumed run builds (its parameters may be on the meta device).

    Measured on a one-parameter twin of each param group, stepped once, so that the keys and
    dtypes are torch's own for that type and those settings (SGD: ``momentum_buffer``, none at
    momentum 0; AdamW: ``exp_avg``, ``exp_avg_sq`` and a float32 scalar ``step``) rather than a
    copy of them. Indices count the parameters group after group, as ``state_dict()`` does.
    """
    spec: dict[str, TensorSpec] = {}
    index = 0
    for group in optimizer.param_groups:
        probe = torch.zeros(2, requires_grad=True)
        twin = type(optimizer)([probe], lr=group["lr"])
        twin.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        probe.grad = torch.zeros(2)
        twin.step()
        state = {k: v for k, v in twin.state[probe].items() if isinstance(v, torch.Tensor)}
        for p in group["params"]:
            for key, v in state.items():  # a state tensor is the parameter's shape, or a scalar (AdamW's step)
                spec[f"optim.{index}.{key}"] = (v.dtype, tuple(p.shape) if v.shape == probe.shape else tuple(v.shape))
            index += 1
    return spec


def wrong_optimizer_groups(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """What is wrong with a checkpoint's ``optimizer`` metadata (its param groups' settings), or None.

    Args:
        saved: the metadata's ``optimizer``: one dict per param group, as torch writes them less ``params``.
        optimizer: the optimizer the resumed run builds, whose groups the saved ones update.

    Each group must hold the numeric settings of ``optimizer``'s (lr, weight_decay, momentum or
    betas and eps...) as finite numbers >= 0 (betas in [0, 1)), and no key ``optimizer`` lacks;
    its flags (nesterov, foreach...) may be absent, as in older torch versions' files, where torch
    fills in their defaults.
    """
    ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if not (isinstance(saved, list) and len(saved) == len(ours) and all(isinstance(g, dict) for g in saved)):
        return f"optimizer is {repr(saved)[:60]}, not a list of {len(ours)} param groups"

    def fits(value: Any, like: Any, high: float = math.inf) -> bool:
        if isinstance(like, (list, tuple)):  # betas: (beta1, beta2), each in [0, 1); a list in JSON
            return isinstance(value, list) and len(value) == len(like) and all(fits(v, 0.0, high=1.0) for v in value)
        if isinstance(like, numbers.Real) and not isinstance(like, bool):
            # <= the largest float, not isfinite: NaN fails it, and a huge JSON int makes isfinite raise
            return (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and 0 <= value < high
                and value <= sys.float_info.max
            )
        return type(value) is type(like)  # flags: true/false, or None (fused)

    for i, (group, like) in enumerate(zip(saved, ours)):
        for key in {**like, **group}:
            if key in OPTIMIZER_KERNEL_FLAGS and (group.get(key) is None or isinstance(group.get(key), bool)):
                continue  # a resume keeps its own (TrainState.restore)
            needed = isinstance(like.get(key), (numbers.Real, list, tuple)) and not isinstance(like.get(key), bool)
            if key not in like or (key in group and not fits(group[key], like[key])) or (needed and key not in group):
                shown = repr(group[key])[:60] if key in group else "missing"
                name = key if str(key).isidentifier() else repr(key)  # a key from the file: one line, whatever it holds
                return f"optimizer[{i}].{name} is {shown}, not as torch's {type(optimizer).__name__} has it"
    return None


def _wrong_meta(meta: dict[str, Any]) -> str | None:
    """What is wrong with the metadata the model is rebuilt and used from (edited by hand, damaged), or None."""

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def per_channel(v: Any, channels: int) -> list[float]:  # a number or one per channel -> the numbers, else []
        v = v if isinstance(v, list) else [v]
        ok = len(v) in (1, channels) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        return v if ok else []

    options, shape, pre = meta["model"]["options"], meta["input_shape"], meta["preprocessing"]
    if not (count(options.get("num_classes")) and count(options.get("in_chans"))):
        return f"model options {options} lack num_classes or in_chans"
    if not (isinstance(meta["classes"], list) and all(isinstance(c, str) for c in meta["classes"])):
        return "classes is not a list of names"
    if len(meta["classes"]) != options["num_classes"]:
        return f"{len(meta['classes'])} class names for a model with {options['num_classes']} outputs"
    if not (
        isinstance(shape, list) and len(shape) == 3 and all(count(v) for v in shape) and shape[0] == options["in_chans"]
    ):
        return f"input_shape {shape!r} is not [C, H, W] with C = the model's {options['in_chans']} input channels"
    pre = pre if isinstance(pre, dict) else {"size": "?"}
    std = per_channel(pre.get("std", 1.0), shape[0])
    if not (
        (pre.get("size") is None or count(pre.get("size")))
        and per_channel(pre.get("mean", 0.0), shape[0])
        and std
        and min(std) > 0
    ):
        return f"preprocessing {meta['preprocessing']!r} is not a size and one mean and std > 0 per channel"
    for key in ("tta", "channels_last"):
        if not isinstance(meta.get(key, False), bool):
            return f"{key} is {meta[key]!r}, not true or false"
    shift = meta.get("tta_translate", 0)  # none in checkpoints from before translations
    if not (isinstance(shift, int) and not isinstance(shift, bool) and 0 <= shift <= MAX_TTA_TRANSLATE):
        return f"tta_translate is {shift!r}, not an integer in [0, {MAX_TTA_TRANSLATE}] pixels"
    for key in ("train_precision", "eval_precision"):  # eval_precision: its name in earlier checkpoints
        if meta.get(key, "fp32") not in ("fp32", "bf16", "fp16"):
            return f"{key} is {meta[key]!r}, not fp32, bf16 or fp16"
    if not isinstance(meta["dataset"], str):
        return f"dataset is {meta['dataset']!r}, not a name"
    return None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_weights(net: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Raise a one-line CheckpointError, ``what`` and the first difference, unless ``weights`` are
    exactly ``net``'s state: the same keys, each of the same dtype and shape.

    Compared here, not left to load_state_dict, whose size mismatch is a RuntimeError of many lines
    and which casts another dtype silently.
    """
    first = tensor_mismatch(
        weights, {k: (v.dtype, tuple(v.shape)) for k, v in net.state_dict().items()}, "in the model"
    )
    if first:
        raise CheckpointError(f"{what} ({first}); the checkpoint is damaged")


def load_weights(net: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load ``weights`` into ``net`` strictly, or raise a one-line CheckpointError (see :func:`check_weights`)."""
    check_weights(net, weights, what)
    net.load_state_dict(weights)
