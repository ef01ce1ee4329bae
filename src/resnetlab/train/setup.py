"""Building a run: the data on the device, the network, its optimizer and the batches.

Sizes are checked on a shape-only copy of the network before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from resnetlab.data import BatchLoader, Preprocess, Split, load_dataset, to_float
from resnetlab.errors import UsageError
from resnetlab.inference import Classifier
from resnetlab.models import check_input_size, create_model, freeze_whitened_filters, whiten_first_conv
from resnetlab.train import dist
from resnetlab.train.evaluate import require_test_images
from resnetlab.train.lookahead import Lookahead
from resnetlab.train.recipes import WARMUP_EVERY_SCHEDULE, Recipe
from resnetlab.train.state import ROWS_PER_EPOCH, TrainState
from resnetlab.train.step import make_optimizer, xavier_init
from resnetlab.train.syncbn import convert_sync_batchnorm

if TYPE_CHECKING:
    from resnetlab.train.live import LiveCurves
    from resnetlab.train.request import Request

__all__ = ["Run", "build_run", "channel_stats", "check_train_size", "seeded_subset"]


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


def seeded_subset(split: Split, n: int, seed: int) -> Split:
    """``--subset N --seed S``: a random N-image subset of ``split`` (kept in the split's order)."""
    if n > len(split):
        raise UsageError(f"--subset {n} is larger than the {len(split)}-image training split")
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.subset(pick.sort().values)


@torch.no_grad()
def check_train_size(
    net: nn.Module, size: int, in_chans: int, name: str, batch_size: int, fix: str = "--resize {}"
) -> int:
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
        raise UsageError(
            f"input {size}x{size} is too small for {name}: a downsampling layer would see a 1x1 map; {fix}"
        )
    if norm_area is not None and batch_size * norm_area < 2:
        raise UsageError(
            f"batch size {batch_size} gives {name}'s BatchNorm a single value per channel at {size}x{size} "
            "(a 1x1 map); use --batch-size 2 or more"
        )
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


@dataclass
class Run:
    """A built run: what the loop drives and reads.

    Args:
        recipe: the recipe; ctx: the process group; precision: the resolved training precision.
        classes: the class names; input_shape: the images' (C, H, W).
        train_loader, test_loader: this rank's batches.
        state: what a checkpoint saves (network, optimizer, position...).
        model: the network as trained (DDP- and compile-wrapped where asked).
        classifier: the network with its preprocessing, as evaluated.
        loss_fn: the loss; lr: the peak learning rate applied (scaled by the world size where asked).
        live: the curves drawn live in a notebook (:mod:`resnetlab.train.live`), or None.
    """

    recipe: Recipe
    ctx: dist.DistContext
    precision: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    train_images: int
    train_loader: BatchLoader
    test_loader: BatchLoader
    state: TrainState
    model: nn.Module
    classifier: Classifier
    loss_fn: nn.Module
    lr: float
    live: LiveCurves | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * self.steps_per_epoch

    @property
    def row_every(self) -> int:
        """Steps between two rows of the curve, so an epoch has at least :data:`ROWS_PER_EPOCH` (or one per step)."""
        return max(1, self.steps_per_epoch // ROWS_PER_EPOCH)

    @property
    def title(self) -> str:
        """The curves' title."""
        return f"{self.recipe.model} on {self.recipe.dataset} ({self.recipe.name})"

    def checkpoint_meta(self, data_root: str | None) -> dict[str, Any]:
        """The metadata every checkpoint of this run holds besides its position, sums and history."""
        net, recipe = self.state.net, self.recipe
        return {
            WARMUP_EVERY_SCHEDULE: True,
            "train_images": self.train_images,  # a resume checks the data is the same
            "model": {"name": getattr(net, "name"), "options": dict(getattr(net, "options"))},
            "classes": self.classes,
            "dataset": recipe.dataset,
            "data_root": data_root,
            "input_shape": list(self.input_shape),
            "preprocessing": self.state.preprocess.config(),
            "tta": recipe.tta,
            "tta_translate": recipe.tta_translate,
            "train_precision": self.precision,  # provenance: inference computes in fp32 unless asked otherwise
            "channels_last": recipe.channels_last,
            "eval_batch_size": recipe.eval_batch_size,
            "recipe": dataclasses.asdict(recipe),
            "world_size": self.ctx.world_size,
        }


def load_data(recipe: Recipe, data_root: str | None, resumed_meta: dict[str, Any] | None) -> tuple[Split, Split]:
    """The train and test splits as uint8 tensors (the seeded subset where asked), checked against a resumed run's."""
    train_split, test_split = load_dataset(recipe.dataset, root=data_root)
    require_test_images(test_split, recipe.dataset)
    if recipe.subset:
        train_split = seeded_subset(train_split, recipe.subset, recipe.seed)
    if resumed_meta:  # an image folder may have changed since: the schedule and the classifier depend on it
        then = (resumed_meta["classes"], resumed_meta.get("train_images", len(train_split)))
        if then != (train_split.classes, len(train_split)):
            raise UsageError(
                f"{recipe.dataset} changed since the checkpoint ({len(then[0])} classes and {then[1]} training images "
                f"then, {len(train_split.classes)} and {len(train_split)} now); resume with the same data, "
                "or start a new run"
            )
    return train_split, test_split


def make_loaders(
    net: nn.Module, recipe: Recipe, train_split: Split, test_split: Split, ctx: dist.DistContext
) -> tuple[BatchLoader, BatchLoader]:
    """This rank's training and test batches, once the sizes are checked on ``net``'s shape."""
    c, h, w = train_split.images.shape[1:]
    size, batch_size = recipe.resize or None, recipe.batch_size
    early = sorted(set(recipe.early_sizes()))  # progressive resizing
    if early and not size and h != w:
        raise UsageError(
            f"progressive sizes are square and these images are {h}x{w}; "
            "set --resize too (the square side they are tested at)"
        )
    sizes = [(size or min(h, w), "--resize {}"), *((e, "--progressive-sizes sizes of {}") for e in early)]
    smallest_norm_map = min(check_train_size(net, side, c, recipe.model, batch_size, fix) for side, fix in sizes)
    # Under torchrun every rank needs the same count of full batches (DDP). In one process a final
    # batch of one image is dropped only where a BatchNorm sees a 1x1 map (it cannot normalise one
    # value per channel); every other final batch is kept: published figures depend on the batches.
    drop_last = ctx.world_size > 1 or (len(train_split) % batch_size == 1 and smallest_norm_map == 1)
    train_loader = BatchLoader(
        train_split,
        batch_size,
        shuffle=True,
        seed=recipe.seed,
        drop_last=drop_last,
        device=ctx.device,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    test_loader = BatchLoader(
        test_split, recipe.eval_batch_size, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size
    )
    if len(train_loader) == 0:
        raise UsageError(
            f"batch size {batch_size} x {ctx.world_size} processes "
            f"is larger than the {len(train_split)} training images"
        )
    return train_loader, test_loader


def build_run(request: Request, ctx: dist.DistContext, precision: str, init_from: str | None) -> Run:
    """Data, network, optimizer, batches and state, a resumed run's restored.

    Args:
        request: the resolved request (recipe, data root, a resumed run's checkpoint).
        ctx: the process group; precision: the resolved training precision.
        init_from: pretrained weights to start a new run from.
    """
    from resnetlab.train.request import corrupt_resume

    recipe, resumed = request.recipe, request.resumed
    train_split, test_split = load_data(recipe, request.data_root, resumed[1] if resumed else None)
    c, h, w = train_split.images.shape[1:]
    mean, std = (
        channel_stats(train_split.images) if recipe.normalize else ([0.0] * c, [1.0] * c)
    )  # a resume restores its own
    preprocess = Preprocess(recipe.resize or None, mean, std).to(ctx.device)
    torch.manual_seed(recipe.seed)
    net = create_model(recipe.model, num_classes=len(train_split.classes), in_chans=c, **recipe.model_options())
    train_loader, test_loader = make_loaders(net, recipe, train_split, test_split, ctx)
    if recipe.init == "xavier":
        xavier_init(net)
    if recipe.whiten_stem:
        if not resumed:  # a resume restores the filters with the rest
            batches = train_split.images.split(256)  # read in order, only as far as the patches needed
            whiten_first_conv(net, (preprocess(to_float(b.to(ctx.device))) for b in batches))
        freeze_whitened_filters(net)
    if init_from and not resumed:
        from resnetlab.models.pretrained import load_pretrained

        load_pretrained(net, init_from)
    if ctx.world_size > 1 and recipe.sync_bn:
        net = convert_sync_batchnorm(net, ctx.device)
    net.to(ctx.device)
    if recipe.channels_last:
        net.to(memory_format=torch.channels_last)
    lr = recipe.lr * (ctx.world_size if recipe.scale_lr else 1)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    lookahead = Lookahead(net) if recipe.lookahead else None  # a resume restores its slow copy
    state = TrainState(net, make_optimizer(recipe, net, lr), scaler, preprocess, lookahead)
    if resumed:
        state.restore(*resumed, ctx.device, ctx)
        if state.step > len(train_loader):  # known only now: an epoch's steps depend on the data and the batch size
            raise corrupt_resume(
                request.run_dir, f"position.step is {state.step}, past the {len(train_loader)} steps of an epoch"
            )
    classifier = Classifier(
        net,
        preprocess,
        train_split.classes,
        tta=recipe.tta,
        tta_translate=recipe.tta_translate,
        precision=precision,
        input_shape=(c, h, w),
        channels_last=recipe.channels_last,
    )
    model = dist.wrap(net, ctx)
    if recipe.compile:
        model = torch.compile(model)
    return Run(
        recipe,
        ctx,
        precision,
        train_split.classes,
        (c, h, w),
        len(train_split),
        train_loader,
        test_loader,
        state,
        model,
        classifier,
        nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        lr,
    )
