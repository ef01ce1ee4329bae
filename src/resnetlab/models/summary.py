"""Model inspection: layer shapes, parameters, multiply-adds, input-size limits; the
``resnetlab summary`` and ``resnetlab models`` commands.

Shape and multiply-add probes run on the ``meta`` device by default: every tensor has a shape but
no storage, so even ResNet-152 at 224x224 costs milliseconds. A model with real weights is
probed through ``torch.func.functional_call`` with meta stand-ins for its parameters and
buffers, so it is neither copied nor changed. Multiply-adds come from PyTorch's own
``FlopCounterMode`` (convolutions and matrix products; FLOPs / 2 = MACs), not a hand count.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from resnetlab.errors import UsageError
from resnetlab.models.registry import MODELS, create_model, get_config, list_models

__all__ = [
    "count_parameters",
    "count_macs",
    "layer_shapes",
    "min_input_size",
    "check_input_size",
    "parse_input_shape",
    "model_table",
    "run_summary",
    "run_models",
]

InputShape = Sequence[int]

# Largest side min_input_size tries before giving up; far above any image this project sees.
_PROBE_LIMIT = 4096


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once).

    Args:
        model: any module (meta-device modules work too).
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Probes must not update BatchNorm statistics nor fail on 1-value batches; restore each
    # module's own flag afterwards, not just the top one.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _dtype(model: nn.Module) -> torch.dtype:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _forward(model: nn.Module, input_shape: InputShape, meta: bool = True) -> torch.Tensor:
    """One eval-mode, no-grad forward on zeros of ``input_shape``; on meta tensors if ``meta``."""
    shape = tuple(int(s) for s in input_shape)
    with _eval_mode(model), torch.no_grad():
        if not meta:
            device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
            return model(torch.zeros(shape, dtype=_dtype(model), device=device))
        tensors = list(itertools.chain(model.parameters(), model.buffers()))
        if all(t.is_meta for t in tensors):
            return model(torch.empty(shape, dtype=_dtype(model), device="meta"))
        stand_ins = {
            name: torch.empty_like(t, device="meta")
            for name, t in itertools.chain(
                model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
            )
        }
        x = torch.empty(shape, dtype=_dtype(model), device="meta")
        return functional_call(model, stand_ins, (x,))


def layer_shapes(model: nn.Module, input_shape: InputShape, meta: bool = True) -> list[tuple[str, torch.Size]]:
    """Class name and output shape of each top-level child, in the order the forward calls them.

    Forward hooks record the calls, so this is the true execution order (a child called twice
    appears twice; one never called does not appear). For the chapter's ``nn.Sequential`` it gives
    the chapter's table; for ``ResNet`` the children are conv1, bn1, relu, maxpool (an Identity with
    stem "small"), layer1..layer4, final_bn and final_relu (pre-activation only), avgpool,
    flatten (before fc) and fc.

    Args:
        model: the network.
        input_shape: (N, C, H, W).
        meta: run on shape-only meta tensors (instant); False runs the real weights.
    """
    records: list[tuple[str, torch.Size]] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        records.append((module.__class__.__name__, output.shape))

    handles = [child.register_forward_hook(hook) for child in model.children()]
    try:
        _forward(model, input_shape, meta=meta)
    finally:
        for h in handles:
            h.remove()
    return records


def count_macs(model: nn.Module, input_shape: InputShape, meta: bool = True) -> int:
    """Multiply-adds of one forward pass over a batch of ``input_shape``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2): convolutions and matrix
    products, the usual convention (BatchNorm, ReLU, pooling and additions are not counted).

    Args:
        model: the network.
        input_shape: (N, C, H, W); the count covers the whole batch.
        meta: count on shape-only meta tensors (instant, same count); False runs the real weights.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        _forward(model, input_shape, meta=meta)
    return counter.get_total_flops() // 2


def _in_chans(model: nn.Module) -> int:
    options = getattr(model, "options", None)
    if isinstance(options, dict) and _positive_int(options.get("in_chans")):
        return int(options["in_chans"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise UsageError(f"cannot tell how many input channels {model.__class__.__name__} takes; pass in_chans=")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _accepts(model: nn.Module, size: int, in_chans: int) -> bool:
    try:
        _forward(model, (1, in_chans, size, size), meta=True)
    except RuntimeError:  # "Kernel size can't be greater than actual input size", "Output size is too small"
        return False
    return True


def _probe_min_size(model: nn.Module, in_chans: int) -> int:
    # Doubling then bisection; assumes a model that accepts a side accepts every larger one,
    # true of convolution and pooling stacks.
    size, last_rejected = 1, 0
    while not _accepts(model, size, in_chans):
        last_rejected = size
        size *= 2
        if size > _PROBE_LIMIT:
            raise UsageError(
                f"{_label(model)} rejects every square input up to "
                f"{_PROBE_LIMIT}x{_PROBE_LIMIT} with {in_chans} channels"
            )
    lo, hi = last_rejected, size  # lo rejected (or 0), hi accepted
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _accepts(model, mid, in_chans):
            hi = mid
        else:
            lo = mid
    return hi


def _meta_probe_model(name: str, **options: Any) -> nn.Module:
    """A throwaway shape-only build of a registered model, for counting and probing.

    Its BatchNorm layers are replaced by Identity: in eval mode they change neither shapes nor
    the multiply-add count (FlopCounterMode counts convolutions and matrix products only), but
    their meta kernel is a slow Python decomposition, three quarters of a meta forward's time.
    """
    with torch.device("meta"):
        model = create_model(name, **options)
    _replace_norms(model)
    return model


def _replace_norms(module: nn.Module) -> None:
    for child_name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, nn.Identity())
        else:
            _replace_norms(child)


@functools.lru_cache(maxsize=None)
def _registered_min_size(name: str, options: tuple[tuple[str, Any], ...]) -> int:
    model = _meta_probe_model(name, **dict(options))
    return _probe_min_size(model, _in_chans(model))


def min_input_size(model_or_name: nn.Module | str, **options: Any) -> int:
    """Smallest square side H = W the model's forward pass accepts (eval mode).

    Found by probing meta-device forwards, not by a table, so it holds for any option and any
    module. Every registered ResNet accepts 1x1: PyTorch's padded 3x3/2, 7x7/2 and max-pool
    layers output ceil(H / 2) >= 1, so the map never vanishes; tiny inputs simply reach the
    later stages as 1x1 maps. (Training mode adds BatchNorm's own limit: more than one value
    per channel, i.e. a batch of 2+ when the last map is 1x1.)

    Args:
        model_or_name: a module, or a registered name built with ``options``.
        **options: for a name, create_model's options (num_classes, in_chans, stem, width,
            ...); for a module, optionally ``in_chans`` when it cannot be read from the model.
    """
    if isinstance(model_or_name, str):
        canonical, _ = get_config(model_or_name)
        return _registered_min_size(canonical, tuple(sorted(options.items())))
    name, model_options = getattr(model_or_name, "name", None), getattr(model_or_name, "options", None)
    if not options and isinstance(name, str) and name in MODELS and isinstance(model_options, dict):
        # The model contract: create_model(name, **options) rebuilds it, so use the cached probe.
        return _registered_min_size(name, tuple(sorted(model_options.items())))
    extra = set(options) - {"in_chans"}
    if extra:
        raise UsageError(f"min_input_size takes only in_chans with a module, got {', '.join(sorted(extra))}")
    in_chans = options.get("in_chans") or _in_chans(model_or_name)
    return _probe_min_size(model_or_name, in_chans)


def _label(model: nn.Module) -> str:
    name = getattr(model, "name", None) or model.__class__.__name__
    options = getattr(model, "options", None)
    if isinstance(options, dict) and "stem" in options:
        return f"{name} (stem {options['stem']})"
    return name


def check_input_size(model: nn.Module, size: int | Sequence[int]) -> None:
    """Raise UsageError when an input of ``size`` (side, or (H, W)) is too small for ``model``.

    Args:
        model: the network.
        size: the square side, or (height, width).
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    smallest = min_input_size(model)
    if h < smallest or w < smallest:
        raise UsageError(
            f"input {h}x{w} is too small for {_label(model)}; the smallest it accepts is {smallest}x{smallest}"
        )


_SHAPE_FORM = "NxCxHxW, e.g. 1x1x224x224"


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    """Parse "NxCxHxW" (four positive integers) into a tuple.

    Args:
        text: the ``--input`` value.

    Raises:
        UsageError: anything else, showing the expected form.
    """
    parts = re.split(r"[xX]", text.strip())
    # isdecimal, not isdigit: it accepts exactly the digits int() parses (isdigit also takes "²")
    if len(parts) != 4 or not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise UsageError(f"--input {text!r} is not a shape of four positive integers; expected {_SHAPE_FORM}")
    n, c, h, w = (int(p) for p in parts)
    if max(n, c, h, w) > 2**31 - 1:  # torch's sizes are int64, and their product too: far beyond any tensor anyway
        raise UsageError(f"--input {text!r} has a dimension above 2**31 - 1; expected {_SHAPE_FORM}")
    return n, c, h, w


def _format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def run_summary(args: argparse.Namespace) -> int:
    """``resnetlab summary``: the chapter's per-layer shape lines, then parameters and multiply-adds."""
    input_shape = parse_input_shape(args.input)
    n, c, h, w = input_shape
    if args.in_chans is not None and args.in_chans < 1:  # else the mismatch hint below would suggest an invalid --input
        raise UsageError(f"--in-chans must be a positive integer, got {args.in_chans}")
    if args.in_chans is not None and args.in_chans != c:
        raise UsageError(
            f"--in-chans {args.in_chans} does not match the {c} channel(s) of --input {args.input}; "
            f"drop --in-chans or use --input {n}x{args.in_chans}x{h}x{w}"
        )
    options: dict[str, Any] = {}
    if args.stem is not None:
        options["stem"] = args.stem
    if args.width is not None:
        options["width"] = args.width
    if args.max_width is not None:
        options["max_width"] = args.max_width
    # Shapes, counts and limits need no weights: build on meta, instantly, at any size.
    with torch.device("meta"):
        model = create_model(args.model, num_classes=args.num_classes, in_chans=c, **options)
    check_input_size(model, (h, w))
    for cls_name, shape in layer_shapes(model, input_shape):
        print(f"{cls_name} output shape:\t {shape}")
    print(f"parameters: {count_parameters(model):,}")
    print(f"multiply-adds: {count_macs(model, input_shape) / 1e9:.3f} G per forward of {_format_shape(input_shape)}")
    return 0


def model_table(sizes: Sequence[int] = (96, 224), num_classes: int = 10, in_chans: int = 1) -> list[dict[str, Any]]:
    """One row per registered model (default options): name, layout, parameters, MACs per size.

    Args:
        sizes: square input sides to count multiply-adds at (one image per forward).
        num_classes: classifier outputs.
        in_chans: input channels.
    """
    rows = []
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_chans=in_chans)
        parameters = count_parameters(model)
        _replace_norms(model)  # after counting its parameters; see _meta_probe_model
        rows.append(
            {
                "name": name,
                "layout": MODELS[name].describe(),
                "parameters": parameters,
                "macs": {s: count_macs(model, (1, in_chans, s, s)) for s in sizes},
            }
        )
    return rows


def run_models(args: argparse.Namespace) -> int:
    """``resnetlab models``: the registry as a table."""
    sizes = (96, 224)
    rows = model_table(sizes)
    print("Registered models: 1 input channel, 10 classes, default options (stem imagenet, width 64);")
    print("G multiply-adds per single-image forward at 96x96 and 224x224.")
    header = f"{'name':<18} {'blocks':<32} {'parameters':>12} {'GMACs@96':>9} {'GMACs@224':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        macs = row["macs"]
        print(
            f"{row['name']:<18} {row['layout']:<32} {row['parameters']:>12,} "
            f"{macs[96] / 1e9:>9.3f} {macs[224] / 1e9:>10.3f}"
        )
    return 0
