"""Network assembly: the chapter's ResNet-18 (``d2l_resnet``) and the paper family (``ResNet``).

``d2l_resnet`` returns the chapter's ``nn.Sequential(b1, ..., b5, pool, flatten, linear)`` so that
iterating its children reproduces the chapter's shape table. ``ResNet`` follows torchvision's
``models/resnet.py`` module names (conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc, and
``downsample`` inside blocks) so torchvision state dicts load with ``strict=True``; it also builds
the pre-activation nets from the pre-activation units.

Both accept the same options: ``num_classes``, ``in_chans``, ``stem``, ``width``, ``max_width``
and ``zero_init_residual``. Bad values raise :class:`resnetlab.errors.UsageError`.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from torch import Tensor, nn

from resnetlab.errors import UsageError
from resnetlab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Residual,
    conv3x3,
    resnet_block,
)

__all__ = ["ResNet", "d2l_resnet", "validate_options", "STEMS", "BlockType"]

# stem name -> what it is for; "imagenet" is the paper's and the chapter's.
STEMS: dict[str, str] = {
    "imagenet": "7x7/2 conv + 3x3/2 max-pool, for 96-224 px inputs",
    "small": "3x3/1 conv, no max-pool, for 28-32 px inputs",
}

BlockType = Union[type[BasicBlock], type[Bottleneck], type[PreActBasicBlock], type[PreActBottleneck]]


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a width is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def validate_options(
    num_classes: Any, in_chans: Any, stem: Any, width: Any, zero_init_residual: Any, max_width: Any = None
) -> None:
    """Raise UsageError, one line naming the problem and the fix, for any meaningless option.

    Args:
        num_classes: number of output classes; a positive int.
        in_chans: number of input channels; a positive int.
        stem: a key of ``STEMS``.
        width: base channel count (64 in the paper); a positive int.
        zero_init_residual: a bool.
        max_width: None, or the most channels a stage may have; an int >= ``width``.
    """
    if not _is_int(num_classes) or num_classes < 1:
        raise UsageError(
            f"num_classes must be a positive integer, got {num_classes!r}; pass the dataset's class count, e.g. 10"
        )
    if not _is_int(in_chans) or in_chans < 1:
        raise UsageError(
            f"in_chans must be a positive integer, got {in_chans!r}; use 1 for grayscale or 3 for RGB images"
        )
    if stem not in STEMS:
        choices = " or ".join(f"{k!r} ({v})" for k, v in STEMS.items())
        raise UsageError(f"unknown stem {stem!r}; use {choices}")
    if not _is_int(width) or width < 1:
        raise UsageError(f"width must be a positive integer, got {width!r}; it is the base channel count (default 64)")
    if not isinstance(zero_init_residual, bool):
        raise UsageError(f"zero_init_residual must be True or False, got {zero_init_residual!r}")
    if max_width is not None and (not _is_int(max_width) or max_width < width):
        raise UsageError(
            f"max_width must be None or an integer of at least the width ({width}), got {max_width!r}; "
            "it caps the channels of the later stages"
        )


def _stage_widths(width: int, max_width: int | None) -> list[int]:
    """Channels of the four stages: ``width`` doubled at each, capped at ``max_width`` (None: no cap)."""
    return [width * 2**i if max_width is None else min(width * 2**i, max_width) for i in range(4)]


def _validate_layers(layers: Sequence[int]) -> tuple[int, int, int, int]:
    layers = tuple(layers)
    if len(layers) != 4 or not all(_is_int(n) and n >= 1 for n in layers):
        raise UsageError(f"layers must be 4 positive block counts, one per stage, e.g. (2, 2, 2, 2); got {layers!r}")
    return layers  # type: ignore[return-value]


def _resolved(
    num_classes: int, in_chans: int, stem: str, width: int, zero_init_residual: bool, max_width: int | None
) -> dict[str, Any]:
    # The model contract: create_model(model.name, **model.options) rebuilds the model.
    return {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "stem": stem,
        "width": width,
        "max_width": max_width,
        "zero_init_residual": zero_init_residual,
    }


def d2l_resnet(
    layers: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 10,
    in_chans: int = 1,
    stem: str = "imagenet",
    width: int = 64,
    zero_init_residual: bool = False,
    max_width: int | None = None,
) -> nn.Sequential:
    """The chapter's ResNet: ``nn.Sequential(b1, b2, b3, b4, b5, pool, flatten, linear)``.

    With the defaults it is the chapter's ResNet-18 (11,178,378 parameters). Weights keep
    PyTorch's default initialisation, as in the chapter (its trainer re-initialises them).

    Args:
        layers: Residual blocks in b2..b5; the chapter uses (2, 2, 2, 2).
        num_classes: outputs of the final Linear layer.
        in_chans: input channels (1 for Fashion-MNIST).
        stem: "imagenet" is the chapter's b1 (7x7/2 conv, BN, ReLU, 3x3/2 max-pool); "small"
            replaces it by a 3x3/1 conv, BN, ReLU for 28-32 px inputs.
        width: channels of b1 and b2; b3..b5 use 2x, 4x, 8x (the chapter: 64).
        zero_init_residual: zero bn2's scale in every Residual, so each starts as
            relu(shortcut).
        max_width: the most channels a stage has (None, the chapter's: no cap).
    """
    validate_options(num_classes, in_chans, stem, width, zero_init_residual, max_width)
    layers = _validate_layers(layers)
    if stem == "imagenet":
        b1 = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    else:
        b1 = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
    channels = _stage_widths(width, max_width)
    stages = []
    previous = width
    for i, (num_channels, num_residuals) in enumerate(zip(channels, layers)):
        stages.append(nn.Sequential(*resnet_block(previous, num_channels, num_residuals, first_block=(i == 0))))
        previous = num_channels
    net = nn.Sequential(b1, *stages, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels[-1], num_classes))
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, Residual):
                m.zero_init_last()
    net.name = None  # set by create_model
    net.options = _resolved(num_classes, in_chans, stem, width, zero_init_residual, max_width)
    return net


class ResNet(nn.Module):
    """ResNet of He et al. 2016 (Table 1), torchvision layout; pre-activation with preact blocks.

    Layout: conv1 -> bn1 -> relu -> maxpool -> layer1..layer4 -> [final_bn -> final_relu] ->
    avgpool -> flatten -> fc. The bracketed pair exists only for pre-activation blocks (their
    units end on a bare addition, so the last one needs normalising and activating before
    pooling, as in the paper). The stem is the same for both kinds: the paper also activates
    right after conv1. ``flatten`` is an ``nn.Flatten`` module rather than torchvision's
    ``torch.flatten`` call so that every step is a child; it holds no state, so torchvision
    state dicts still load strictly.

    Args:
        block: BasicBlock or Bottleneck (plain), PreActBasicBlock or PreActBottleneck.
        layers: number of blocks in layer1..layer4, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes: outputs of fc.
        in_chans: input channels.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "small" (3x3/1 conv, and
            ``maxpool`` is an Identity) for 28-32 px inputs.
        width: channels of layer1's blocks (64 in the paper); layer2..4 use 2x, 4x, 8x, and
            bottlenecks output 4x that.
        zero_init_residual: zero the last BN's scale of every plain block (last conv's weight
            of every pre-activation unit, which has no BN after it), so each block starts as
            (ReLU of) its shortcut; about +0.2-0.3% ImageNet accuracy (Goyal et al. 2017).
        max_width: the most channels a stage's blocks have (None, the paper's: no cap). The
            last stage holds most of the weights; on 28 px images capping it buys speed for
            little accuracy (docs/performance.md).
    """

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 1,
        stem: str = "imagenet",
        width: int = 64,
        zero_init_residual: bool = False,
        max_width: int | None = None,
    ) -> None:
        super().__init__()
        validate_options(num_classes, in_chans, stem, width, zero_init_residual, max_width)
        layers = _validate_layers(layers)
        if block not in (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck):
            raise UsageError(
                f"block must be BasicBlock, Bottleneck, PreActBasicBlock or PreActBottleneck, got {block!r}"
            )
        self.name: str | None = None  # set by create_model
        self.options = _resolved(num_classes, in_chans, stem, width, zero_init_residual, max_width)
        self.preact = block.preact
        self.inplanes = width

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_chans, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # Identity keeps one forward and one set of names for both stems.
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        )
        planes = _stage_widths(width, max_width)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.num_features = planes[3] * block.expansion
        if self.preact:
            self.final_bn: nn.Module | None = nn.BatchNorm2d(self.num_features)
            self.final_relu: nn.Module | None = nn.ReLU(inplace=True)
        else:
            self.final_bn = None
            self.final_relu = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            # Skipped on meta tensors (shape-only probes): there is nothing to fill, and meta
            # normal_ would import torch._dynamo, seconds for nothing.
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)):
                    m.zero_init_last()

    def _make_layer(self, block: BlockType, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        outplanes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != outplanes:
            downsample = block.make_shortcut(self.inplanes, outplanes, stride)
        units = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = outplanes
        units.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*units)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything before pooling: the (N, num_features, H/32, W/32) feature map (H/8 for stem small)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.final_bn is not None and self.final_relu is not None:
            x = self.final_relu(self.final_bn(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.forward_features(x))))
