"""Start from the ecosystem's ResNet weights: torchvision or timm files, loaded safely.

    >>> from resnetlab import create_model, load_pretrained
    >>> net = create_model("resnet50", num_classes=10, in_chans=1)   # Fashion-MNIST head and stem
    >>> load_pretrained(net, "resnet50-11ad3fa6.pth")                # torchvision ImageNet weights
    >>> load_pretrained("resnet18", "model.safetensors")             # or build the matching model

``resnetlab train --init-from PATH`` does the same before training.

* Files: ``torch.save`` files (``.pth``/``.pt``/``.bin``) are read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers: a
  pickle carrying code is refused with a :class:`CheckpointError`, never run. ``.safetensors``
  files are read with safetensors. The state dict may be bare or nested under ``state_dict`` or
  ``model`` (a ``module.`` prefix from DataParallel is dropped); a resnetlab checkpoint works too.
* Names: resnetlab's ResNet uses torchvision's module names (conv1, bn1, layer1..4 with
  ``downsample``, fc), which timm's ResNets (resnet18..152) share, so both load strictly.
* Input channels: 3-channel (RGB) stem weights are adapted to the model's ``in_chans`` as timm's
  ``adapt_input_conv`` does: summed over RGB for 1 channel (a grey image then gives the logits
  the RGB model gives that image repeated three times), tiled and scaled by 3 / in_chans
  otherwise.
* Classes: a classifier of another size (1000 ImageNet classes into a 10-class model) is left at
  the model's fresh initialisation, with a note; everything else must match exactly, and a
  mismatch (another depth, width or stem) is a CheckpointError naming the first differing keys.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import CheckpointError, first_line
from resnetlab.fileio import CHECKPOINT_NAME, is_torch_save, read_head

__all__ = ["load_pretrained", "read_weights", "adapt_input_conv", "PretrainedReport"]

log = logging.getLogger("resnetlab.pretrained")

_NESTED = ("state_dict", "model")
_SHOW = 3  # differing keys named in a mismatch message


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did; also set as ``model.pretrained_report``."""

    path: str
    loaded: int = 0  # tensors copied into the model
    in_chans: tuple[int, int] | None = None  # (file's, model's) stem channels when adapted
    reset: list[str] = field(default_factory=list)  # keys left at the model's initialisation
    notes: list[str] = field(default_factory=list)


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a file (a run directory: its checkpoint), else a CheckpointError saying what to give."""
    p = Path(path)
    # fine-tuning from a resnetlab run, as every other command takes it
    if p.is_dir() and (p / CHECKPOINT_NAME).is_file():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no weights file at {p}; give a torchvision/timm .pth, .pt or .safetensors file")
    return p


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch.save or safetensors weights file -> a flat state dict of CPU tensors (never unpickles code)."""
    p = weights_file(path)
    head = read_head(p, "other weights")
    obj = _read_torch(p) if is_torch_save(head) else _read_safetensors(p)
    return _state_dict(obj, p)


def _read_torch(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a reference to {found.group(1)}" if found else "objects torch.load(weights_only=True) does not allow"
        raise CheckpointError(
            f"{p} carries non-weight objects ({what}); it is refused because unpickling it could run code. "
            "Re-save only the state dict (torch.save(model.state_dict(), ...)) or use .safetensors"
        ) from None
    except (
        EOFError,
        OSError,
        ValueError,
        RuntimeError,
        struct.error,
        IndexError,
        KeyError,
        AssertionError,
        TypeError,
        zipfile.BadZipFile,
    ) as err:  # how damaged bytes surface; anything else (MemoryError, a bug) is not hidden
        if isinstance(err, RuntimeError) and ("weights only" in str(err).lower() or "weights_only" in str(err)):
            raise CheckpointError(
                f"{p} carries non-weight objects and is refused (unpickling it could run code); "
                "re-save only the state dict or use .safetensors"
            ) from None
        raise CheckpointError(
            f"{p} is not a readable torch.save file ({first_line(err)}); it may be truncated"
        ) from None


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{p} is neither a torch.save nor a safetensors file ({first_line(err)}); "
            "give a .pth, .pt or .safetensors weights file"
        ) from None
    if "resnetlab" in meta:  # a resnetlab checkpoint: its network is under "model."
        tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return tensors


def _state_dict(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):  # {"state_dict": {...}} or {"model": {...}}, possibly once more nested
        if isinstance(obj, dict):
            nested = next((obj[k] for k in _NESTED if isinstance(obj.get(k), dict)), None)
            if nested is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = nested
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p} holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{p} is not a plain state dict: {bad[0]!r} holds {type(obj[bad[0]]).__name__}, not a tensor"
        )
    sd = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "_orig_mod."):  # DataParallel/DDP, torch.compile
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Stem conv weights (O x I x kH x kW, I = 3 for RGB) -> O x in_chans x kH x kW, as timm does.

    1 channel: the sum over RGB (for I a multiple of 3 > 3, the sum of each RGB triple);
    otherwise the RGB filters tiled to ``in_chans`` and scaled by 3 / in_chans.
    """
    dtype = weight.dtype
    w = weight.float()
    o, i, kh, kw = w.shape
    if in_chans == i:
        return weight
    if in_chans == 1:
        if i > 3 and i % 3 == 0:
            w = w.reshape(o, i // 3, 3, kh, kw).sum(dim=2)
        elif i == 3:
            w = w.sum(dim=1, keepdim=True)
        else:
            raise CheckpointError(
                f"cannot adapt a {i}-channel stem to 1 channel; only RGB (3-channel) stems are adapted"
            )
    elif i == 3:
        w = w.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / float(in_chans))
    else:
        raise CheckpointError(
            f"cannot adapt a {i}-channel stem to {in_chans} channels; only RGB (3-channel) stems are adapted"
        )
    return w.to(dtype)


def _stem_key(target: dict[str, torch.Tensor]) -> str | None:
    """The first convolution's weight (conv1.weight in torchvision layout)."""
    return next((k for k, v in target.items() if k.endswith("weight") and v.dim() == 4), None)


def _head(model: nn.Module) -> str | None:
    """The module name of the final Linear classifier (fc in torchvision layout)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def describe_weights(sd: dict[str, torch.Tensor]) -> str:
    """A short guess of what a torchvision-layout state dict is, e.g. "resnet50, width 64, imagenet stem"."""
    from resnetlab.models.registry import MODELS

    stages = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
        stages.append(max(idx) + 1 if idx else 0)
    block = "bottleneck" if any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in sd) else "basic"
    parts = []
    name = next(
        (n for n, c in MODELS.items() if not c.d2l and not c.preact and c.block == block and list(c.layers) == stages),
        None,
    )
    parts.append(name or f"{block} blocks {stages}")
    stem = sd.get("conv1.weight")
    if stem is not None and stem.dim() == 4:
        parts.append(f"width {stem.shape[0]}")
        parts.append(
            {7: "imagenet stem", 3: "small stem"}.get(stem.shape[-1], f"{stem.shape[-1]}x{stem.shape[-1]} stem")
        )
        parts.append(f"{stem.shape[1]} input channels")
    fc = sd.get("fc.weight")
    if fc is not None:
        parts.append(f"{fc.shape[0]} classes")
    return ", ".join(parts)


def _model_label(model: nn.Module) -> str:
    name = getattr(model, "name", None) or type(model).__name__
    opts = getattr(model, "options", None)
    if isinstance(opts, dict) and "width" in opts:
        capped = f", max width {opts['max_width']}" if opts.get("max_width") is not None else ""
        return f"{name} (width {opts['width']}{capped}, {opts.get('stem')} stem)"
    return str(name)


def _is_main_process() -> bool:
    return (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors holding a NaN or an infinity (damaged weights)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def load_pretrained(
    model: nn.Module | str, path: str | os.PathLike, *, verbose: bool = True, **options: Any
) -> nn.Module:
    """Load torchvision or timm ResNet weights into ``model`` (in place) and return it.

    Args:
        model: the network (a registry ResNet, torchvision layout), or a registry name: then the
            model is built with ``options``, taking ``num_classes`` and ``in_chans`` from the
            file unless given.
        path: a ``.pth``/``.pt`` (torch.save, read with ``weights_only=True``) or ``.safetensors``
            file holding a state dict (bare or under ``state_dict``/``model``).
        verbose: print what was adapted (the stem's channels, a reset classifier).
        **options: create_model options when ``model`` is a name.

    Returns:
        The model; ``model.pretrained_report`` (:class:`PretrainedReport`) says what was adapted.

    Raises:
        CheckpointError: unreadable file, a pickle carrying code, or weights of another
            architecture (the first differing keys and shapes are named).
    """
    sd = read_weights(path)
    if isinstance(model, str):
        from resnetlab.models.registry import create_model

        if isinstance(sd.get("fc.weight"), torch.Tensor):
            options.setdefault("num_classes", int(sd["fc.weight"].shape[0]))
        if isinstance(sd.get("conv1.weight"), torch.Tensor) and sd["conv1.weight"].dim() == 4:
            options.setdefault("in_chans", int(sd["conv1.weight"].shape[1]))
        model = create_model(model, **options)
    elif options:
        raise TypeError(f"load_pretrained got options {sorted(options)} for an already built model")

    report = PretrainedReport(path=str(path))
    original = dict(sd)  # for the mismatch message: what the file holds before any adaptation
    target = model.state_dict()
    _adapt_stem(sd, target, report)
    _reset_head(sd, target, _head(model), report)
    optional = {k for k in target if k.endswith("num_batches_tracked")}  # absent from old torchvision files
    _check_fit(
        sd,
        target,
        optional,
        report,
        f"weights in {path} do not fit {_model_label(model)}: the file looks like {describe_weights(original)}",
    )
    sd = {k: v for k, v in sd.items() if k in target}
    broken = non_finite(sd)
    if broken:  # training from them fails at step 0 with "loss is nan ... lower --lr", which is not the cause
        raise CheckpointError(
            f"{path} holds non-finite (NaN or inf) weights in {len(broken)} tensor(s), e.g. {broken[0]}; "
            "it is damaged: use other weights"
        )
    with torch.no_grad():
        result = model.load_state_dict(sd, strict=False)
    left = [k for k in result.missing_keys if k not in optional and k not in report.reset]
    if left or result.unexpected_keys:  # cannot happen after the checks above; never load half a model silently
        raise CheckpointError(
            f"weights in {path} did not load: missing {left[:_SHOW]}, unexpected {result.unexpected_keys[:_SHOW]}"
        )
    report.loaded = len(sd)
    for note in report.notes:
        log.info(note)
        if verbose and _is_main_process():
            print(f"load_pretrained: {note}", flush=True)
    model.pretrained_report = report
    return model


def _adapt_stem(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: PretrainedReport) -> None:
    """RGB stem weights into a model with other input channels (in ``sd``, noted in ``report``)."""
    stem = _stem_key(target)
    if stem is not None and stem in sd:
        w, t = sd[stem], target[stem]
        if w.dim() == 4 and w.shape[1] != t.shape[1] and (w.shape[0], *w.shape[2:]) == (t.shape[0], *t.shape[2:]):
            sd[stem] = adapt_input_conv(int(t.shape[1]), w)
            report.in_chans = (int(w.shape[1]), int(t.shape[1]))
            how = "summed over RGB" if t.shape[1] == 1 else f"tiled and scaled by 3/{t.shape[1]}"
            report.notes.append(f"stem {stem} adapted from {w.shape[1]} to {t.shape[1]} input channels ({how})")


def _reset_head(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], head: str | None, report: PretrainedReport
) -> None:
    """Another number of classes: the file's classifier is dropped and the model keeps its fresh head."""
    hw, hb = f"{head}.weight", f"{head}.bias"
    if head is not None and hw in sd and hw in target:
        w, t = sd[hw], target[hw]
        if w.dim() == 2 and w.shape[0] != t.shape[0] and w.shape[1] == t.shape[1]:
            for k in (hw, hb):
                if k in sd and k in target:
                    sd.pop(k)
                    report.reset.append(k)
            report.notes.append(
                f"classifier {head} reset: the file has {w.shape[0]} classes, the model {t.shape[0]} "
                f"({head} keeps its fresh initialisation)"
            )


def _check_fit(
    sd: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    optional: set[str],
    report: PretrainedReport,
    what: str,
) -> None:
    """Raise a one-line CheckpointError (``what`` and the first differences) unless ``sd`` fits ``target``."""
    missing = [k for k in target if k not in sd and k not in optional and k not in report.reset]
    unexpected = [k for k in sd if k not in target]
    shapes = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(
                f"{len(shapes)} shapes differ: "
                + ", ".join(f"{k} file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in shapes[:_SHOW])
            )
        if missing:
            parts.append(f"{len(missing)} missing from the file: {', '.join(missing[:_SHOW])}")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model: {', '.join(unexpected[:_SHOW])}")
        raise CheckpointError(
            f"{what}; " + "; ".join(parts) + ". Build the model that matches the file (model name, width, stem)"
        )
