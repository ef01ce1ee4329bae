"""Training recipes as plain data: one frozen dataclass, three named instances.

Every field can be overridden from the command line (``--batch-size 128``) or from Python
(``resnetlab.train("fast", epochs=3)``). ``None`` in a model field means "the model's default".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

from resnetlab.checkpoint import MAX_TTA_TRANSLATE
from resnetlab.errors import UsageError
from resnetlab.models.registry import OPTIONS

AUGMENTS = ("flip", "crop", "erase")
# --seed takes torch's own seed range (torch.manual_seed wraps negative seeds modulo 2**64, and
# negative seeds always trained); the derived seeds (the shuffle's in data/loader.py, the
# augmentation's in train/loop.py) are taken modulo 2**64, so every seed in it is valid.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Image sides beyond int32 overflow inside torch (a traceback); below it, too large a size is the
# CLI's one-line out-of-memory error.
MAX_SIZE = 2**31 - 1
MAX_FLOAT32 = 3.4028234663852886e38
# A field's annotation -> the values it takes and their name. bool is an int to Python: refused where it is not named.
_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "str": (str, "a string"),
    "int": (numbers.Integral, "an integer"),
    "float": (numbers.Real, "a number"),
    "bool": (bool, "true or false"),
}


@dataclass(frozen=True)
class Recipe:
    """One training configuration.

    Args:
        name: the recipe's name (d2l, fast, accurate, best).
        model: registry name (see ``resnetlab models``).
        dataset: ``fashion-mnist``, ``mnist``, ``cifar10`` or ``folder:PATH``.
        epochs: passes over the training split.
        batch_size: images per step and process; the global batch is this times the world size.
        lr: peak learning rate.
        resize: square side the images are resized to, or 0 for the native size.
        progressive_sizes: progressive resizing: a comma list of square sizes the first epochs train
            at (``16``: epoch 1 at 16 px), or ``none``. The other epochs, and always the last one,
            train at ``resize``, the size tested at, so that the weights and the BatchNorm
            statistics end at it.
        optimizer: ``sgd`` or ``adamw``.
        momentum: SGD momentum (0 is the chapter's plain SGD); adamw ignores it.
        nesterov: Nesterov momentum for SGD (needs momentum > 0); adamw ignores it.
        weight_decay: decoupled for adamw, L2 for sgd.
        schedule: ``constant``, ``onecycle`` (linear decay to 0) or ``cosine`` (to 0), each after the warm-up.
        warmup: fraction of all steps spent warming up, linearly from lr / (warm-up steps) to lr (any schedule).
        label_smoothing: cross-entropy label smoothing.
        augment: ``none`` or a comma list of ``flip``, ``crop``, ``erase``.
        crop_padding: padding of the random crop, in pixels of the trained size.
        normalize: standardise inputs with the training split's mean and std.
        init: ``xavier`` (the chapter's ``train_ch6``) or ``default`` (the model's own).
        precision: ``auto`` (bf16 where the hardware has it, else fp32), ``fp32``, ``bf16``, ``fp16``.
        channels_last: NHWC memory format for the model and inputs.
        compile: wrap the model in ``torch.compile``.
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        seed: seeds the initialisation, the shuffle, the subset and the augmentation.
        subset: train on a seeded random subset of this many training images (0 = all).
        width: model base width (None = the model's default).
        max_width: the most channels a stage has (None = no cap); the later stages stop doubling there.
        stem: ``imagenet`` or ``small`` (None = the model's default).
        zero_init_residual: zero the last BN of every residual branch.
        whiten_stem: set the first convolution's filters to the whitening basis of the training images'
            patches (each with its negation) and freeze them, as airbench (:mod:`resnetlab.models.whiten`).
        lookahead: every 5 steps pull the weights back to a slow copy that follows them, more
            strongly as the run ends, and end on it, as airbench (:mod:`resnetlab.train.lookahead`).
        tta: average the logits of each test image and its mirror image.
        tta_translate: also average the logits of the test image shifted by this many pixels up-left and
            down-right (weights 1/2, 1/4, 1/4, as airbench), for models trained with crops; 0: none.
        eval_batch_size: batch size for test-set evaluation.
        eval_every: evaluate on the test split after every N-th epoch, and always after the last
            (0: after the last only; Keras's ``validation_freq``, Lightning's ``check_val_every_n_epoch``).
        sync_bn: convert BatchNorm to SyncBatchNorm under torchrun.
        scale_lr: multiply lr by the world size under torchrun.
    """

    name: str = "custom"
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    resize: int = 0
    progressive_sizes: str = ""
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"
    crop_padding: int = 2
    normalize: bool = False
    init: str = "default"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    subset: int = 0
    width: int | None = None
    max_width: int | None = None
    stem: str | None = None
    zero_init_residual: bool = False
    whiten_stem: bool = False
    lookahead: bool = False
    tta: bool = False
    tta_translate: int = 0
    eval_batch_size: int = (
        256  # not 1000: x1.6 faster test passes at 28 px on a 2-core CPU (`resnetlab bench eval-batch`)
    )
    eval_every: int = 1
    sync_bn: bool = False
    scale_lr: bool = False

    def augmentations(self) -> tuple[str, ...]:
        return () if self.augment in ("", "none") else tuple(a.strip() for a in self.augment.split(","))

    def progressive(self) -> tuple[int, ...]:
        """The parsed ``progressive_sizes`` (UsageError if they are not sizes)."""
        if self.progressive_sizes.strip() in ("", "none"):
            return ()
        try:
            sizes = tuple(int(s) for s in self.progressive_sizes.split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1 or max(sizes) > MAX_SIZE:
            raise UsageError(
                f"progressive sizes must be none or a comma list of sizes in [1, 2**31 - 1] pixels, e.g. 16 "
                f"or 16,20; not {self.progressive_sizes!r}"
            )
        return sizes

    def early_sizes(self) -> tuple[int, ...]:
        """The progressive sizes this run uses: one per epoch, never the last."""
        return self.progressive()[: self.epochs - 1]

    def train_size(self, epoch: int) -> int:
        """The square side epoch ``epoch`` (0-based) trains at; 0 is the native size."""
        sizes = self.early_sizes()
        return sizes[epoch] if epoch < len(sizes) else self.resize

    def model_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"zero_init_residual": self.zero_init_residual}
        if self.width is not None:
            options["width"] = self.width
        if self.max_width is not None:
            options["max_width"] = self.max_width
        if self.stem is not None:
            options["stem"] = self.stem
        return options

    def check_types(self) -> "Recipe":
        """Raise UsageError for a field of the wrong type; return self.

        The CLI's flags parse their types; Python callers and checkpoints' metadata (edited,
        damaged) can hold anything, which the range checks of :meth:`validate` met as a TypeError.
        """
        for f in dataclasses.fields(self):
            value, annotation = getattr(self, f.name), str(f.type)
            kind, name = _FIELD_TYPES[annotation.removesuffix(" | None")]
            if value is None and annotation.endswith(" | None"):
                continue
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise UsageError(f"{f.name.replace('_', ' ')} must be {name}, not {value!r}")
        return self

    def validate(self) -> "Recipe":
        """Raise UsageError for values that cannot mean anything; return self."""
        self.check_types()
        # first: inf passes range checks such as lr > 0, and nan fails them obscurely
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{f.name.replace('_', ' ')} must be a finite number, not {value}")
            # torch stores lr and decay as float32 scalars (an int too)
            if f.type == "float" and abs(value) > MAX_FLOAT32:
                raise UsageError(f"{f.name.replace('_', ' ')} must be at most {MAX_FLOAT32:.3g} (float32), not {value}")
        model_width = OPTIONS["width"] if self.width is None else self.width  # the registry default if unset
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, not {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, not {self.eval_batch_size}"),
            (self.eval_every >= 0, f"eval every must be >= 0 epochs (0: after the last only), not {self.eval_every}"),
            (self.lr > 0, f"lr must be > 0, not {self.lr}"),
            (
                0 <= self.resize <= MAX_SIZE,
                f"resize must be in [0, 2**31 - 1] (0 keeps the native size), not {self.resize}",
            ),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), not {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), not {self.label_smoothing}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), not {self.warmup}"),
            (MIN_SEED <= self.seed <= MAX_SEED, f"seed must be in torch's range [-2**63, 2**64 - 1], not {self.seed}"),
            (self.subset >= 0, f"subset must be >= 0 (0 = the whole split), not {self.subset}"),
            (self.width is None or 1 <= self.width <= MAX_SIZE, f"width must be in [1, 2**31 - 1], not {self.width}"),
            (
                self.max_width is None or model_width <= self.max_width <= MAX_SIZE,
                f"max width must be in [{model_width}, 2**31 - 1] (at least the width), not {self.max_width}",
            ),
            (0 <= self.crop_padding <= MAX_SIZE, f"crop padding must be in [0, 2**31 - 1], not {self.crop_padding}"),
            (
                0 <= self.tta_translate <= MAX_TTA_TRANSLATE,
                f"tta translate must be in [0, {MAX_TTA_TRANSLATE}] pixels, not {self.tta_translate}",
            ),
            (self.optimizer in ("sgd", "adamw"), f"unknown optimizer {self.optimizer!r}; use sgd or adamw"),
            # measured with torch 2.13.0 on the AVX2 CPU: fewer than 8 channels in channels_last corrupt memory in a
            # CPU training step (double free, segfault with 1 thread; a hang in backward with 2), e.g. --width 4
            (
                not (self.channels_last and self.width is not None and self.width < 8),
                f"width {self.width} with channels_last crashes PyTorch's CPU kernels (fewer than 8 channels); "
                "use --width 8 or more, or add --no-channels-last",
            ),
            (
                not (self.optimizer == "sgd" and self.nesterov and self.momentum == 0),
                "Nesterov momentum needs momentum; set --momentum (e.g. 0.9) or add --no-nesterov",
            ),
            (
                self.schedule in ("constant", "onecycle", "cosine"),
                f"unknown schedule {self.schedule!r}; use constant, onecycle or cosine",
            ),
            (
                self.precision in ("auto", "fp32", "bf16", "fp16"),
                f"unknown precision {self.precision!r}; use auto, fp32, bf16 or fp16",
            ),
            (self.init in ("xavier", "default"), f"unknown init {self.init!r}; use xavier or default"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        sizes = self.progressive()
        if len(sizes) >= self.epochs:  # the extra sizes were dropped silently
            raise UsageError(
                f"progressive sizes {self.progressive_sizes} name {len(sizes)} early epoch(s), but with {self.epochs} "
                f"epoch(s) only {self.epochs - 1} train before the last (which trains at --resize); "
                "give fewer sizes or more --epochs"
            )
        for aug in self.augmentations():
            if aug not in AUGMENTS:
                raise UsageError(f"unknown augmentation {aug!r}; use none or a comma list of {', '.join(AUGMENTS)}")
        return self


# The chapter's 92.4% soonest on a small CPU: a small stem, images downscaled to 24 px, one-cycle
# SGD with Nesterov momentum, label smoothing, flips and flip test-time augmentation. Width 16
# because on a CPU without bf16 (AVX2 only) the cost grows with width squared. 24 px, batch 128
# at peak lr 0.4 and 3 epochs: the cheapest setting measured that still ends above 92.4% over
# seeds 0-2; smaller images, fewer epochs and progressive resizing end at or below the line, and so
# do 2 epochs with the whitened stem of accurate (on the line, not above it).
# Test accuracy after the last epoch only (eval_every=0): a test pass costs time and changes
# nothing in training; --eval-every 1 draws the per-epoch test curve. The measurements behind
# each choice, with commands and machine: docs/performance.md.
_FAST = Recipe(
    name="fast",
    model="resnet10",
    dataset="fashion-mnist",
    epochs=3,
    batch_size=128,
    lr=0.4,
    resize=24,
    optimizer="sgd",
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="onecycle",
    warmup=0.2,
    label_smoothing=0.1,
    augment="flip",
    normalize=True,
    stem="small",
    width=16,
    precision="auto",
    channels_last=True,
    tta=True,
    eval_every=0,
)

RECIPES: dict[str, Recipe] = {
    # The chapter, field by field: d2l.load_data_fashion_mnist(256, resize=96) + d2l.train_ch6(net, ..., 10, 0.05).
    "d2l": Recipe(
        name="d2l",
        model="d2l_resnet18",
        dataset="fashion-mnist",
        epochs=10,
        batch_size=256,
        lr=0.05,
        resize=96,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        label_smoothing=0.0,
        augment="none",
        normalize=False,
        init="xavier",
        precision="fp32",
        eval_batch_size=256,
    ),
    "fast": _FAST,
    # 94% on a 2-core CPU in minutes: the rung between fast and best (airbench's 94/95/96 ladder). fast's
    # schedule on width 32 (multiples of 32 channels suit the bf16 matrix units) at the native 28 px, with
    # crops of 2 pixels and translation TTA of 1 pixel, which let the small model use more epochs, and a
    # whitened, frozen stem, which reaches in 8 epochs what took 12 without it (at a peak lr of 0.3,
    # which ended above fast's 0.4 on each of seeds 0-2), and lookahead of the weights, which ended
    # higher on every seed it was paired on, for one extra update every 5 steps. The last stage is
    # capped at 128 channels (not 256): it holds most of the weights, and capping it made a step
    # faster on both CPU classes while every run (bf16 on both classes, fp32 on AVX2) still ended
    # above 94%, nearer the line on a Zen 5; --max-width 256 restores the full stage.
    # The measurements behind each choice, with commands and machine: docs/performance.md.
    "accurate": dataclasses.replace(
        _FAST,
        name="accurate",
        epochs=8,
        lr=0.3,
        resize=0,
        augment="flip,crop",
        crop_padding=2,
        width=32,
        max_width=128,
        whiten_stem=True,
        lookahead=True,
        tta_translate=1,
    ),
    # Highest accuracy within a few GPU-hours: a full ResNet-18 at 32 px (native 28 padded by a crop),
    # long cosine schedule, flips, crops and random erasing.
    "best": Recipe(
        name="best",
        model="preact_resnet18",
        dataset="fashion-mnist",
        epochs=60,
        batch_size=256,
        lr=0.1,
        resize=32,
        optimizer="sgd",
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup=0.03,
        label_smoothing=0.1,
        augment="flip,crop,erase",
        crop_padding=4,
        normalize=True,
        stem="small",
        precision="auto",
        channels_last=True,
        tta=True,
    ),
}


# Set in the checkpoints of runs in which every schedule warms up; before 2026-12-01 the constant
# schedule ignored ``warmup``, and a run saved then must resume at the learning rates it trained at.
WARMUP_EVERY_SCHEDULE = "warmup_every_schedule"


def recipe_as_trained(fields: dict[str, Any], meta: dict[str, Any]) -> Recipe:
    """The recipe of a checkpoint (its fields and meta), as it trained: combinations that earlier
    versions ignored silently, and now refuse or honour, stay ignored for the runs that used them."""
    recipe = Recipe(**fields).check_types()
    if len(recipe.progressive()) > len(recipe.early_sizes()):  # the sizes past the last-but-one epoch were dropped
        recipe = dataclasses.replace(recipe, progressive_sizes=",".join(map(str, recipe.early_sizes())) or "none")
    if recipe.optimizer == "sgd" and recipe.nesterov and recipe.momentum == 0:  # it trained as plain SGD
        recipe = dataclasses.replace(recipe, nesterov=False)
    if recipe.schedule == "constant" and not meta.get(WARMUP_EVERY_SCHEDULE):
        recipe = dataclasses.replace(recipe, warmup=0.0)
    return recipe


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with ``overrides`` applied (``None`` values are ignored) and validated."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=2, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown recipe {name!r}; {hint}choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown recipe field(s) {', '.join(unknown)}; fields are {', '.join(sorted(fields))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(RECIPES[name], **given).validate()
