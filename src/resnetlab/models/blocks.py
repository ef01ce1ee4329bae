"""Residual blocks: the chapter's ``Residual`` and the paper family's basic, bottleneck and
pre-activation units.

``Residual`` / ``resnet_block`` are the D2L chapter's PyTorch code, kept as written (conv bias on,
no BatchNorm on the 1x1 projection) so that ``d2l_resnet18`` has the chapter's parameter count.
``BasicBlock`` / ``Bottleneck`` follow torchvision (no conv bias, BatchNorm on the projection,
stride on the 3x3 of the bottleneck, "ResNet v1.5") and keep its attribute names so torchvision
state dicts load with ``strict=True``. ``PreActBasicBlock`` / ``PreActBottleneck`` are the full
pre-activation units of He et al. 2016b, "Identity Mappings in Deep Residual Networks".

Every strided 1x1 convolution (the projection shortcuts) runs through :func:`conv1x1_unit_stride`,
which works around a oneDNN defect; the modules and their parameters are plain ``nn.Conv2d``.

Every block has ``zero_init_last()``, which zeroes the last affine step of its residual branch so
that the block starts out as (ReLU of) its shortcut; ``ResNet(zero_init_residual=True)`` calls it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "Residual",
    "resnet_block",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "Projection",
    "conv1x1",
    "conv3x3",
    "conv1x1_unit_stride",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (the BatchNorm after it has one).

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride; 2 halves height and width.
    """
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride; 2 halves height and width.
    """
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv1x1_unit_stride(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1 convolution, its stride taken by slicing ``x`` first.

    Why: oneDNN's weight gradient of a 1x1 convolution with stride > 1 on a channels_last input
    with fewer input channels than its channel block (8 with AVX2 kernels, 16 with AVX-512) writes
    past its workspace: the heap is corrupted with AVX-512 kernels (a crash at odd batch sizes, fp32
    and bf16 alike) and the gradient is silently wrong with AVX2 kernels. Upstream: oneDNN issue
    6035, "1x1 convolution backward_weights writes past the rtus workspace (nhwc, IC < ic_block)",
    in torch 2.13 and 2.14. A 1x1 kernel reads one pixel per output, so convolving every
    stride-th pixel at stride 1 is the same function (same parameters, multiply-adds and output),
    and it never reaches that path. The module stays a plain ``nn.Conv2d`` with its stride, so
    printing, initialising (the chapter's ``type(m) == nn.Conv2d``) and loading weights see no change.

    Args:
        conv: a ``nn.Conv2d``; anything but an unpadded 1x1 kernel with a stride is simply called.
        x: its input.
    """
    if conv.kernel_size != (1, 1) or conv.stride == (1, 1) or conv.padding != (0, 0):
        return conv(x)
    sh, sw = conv.stride
    return F.conv2d(x[:, :, ::sh, ::sw], conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)


class Projection(nn.Sequential):
    """A projection shortcut: a 1x1 convolution, then (plain blocks) a BatchNorm.

    An ``nn.Sequential`` so that its keys read ``downsample.0.weight``, ``downsample.1.*`` as
    torchvision's and timm's do; its forward differs only in running the convolution through
    :func:`conv1x1_unit_stride`.

    Args:
        conv: the 1x1 convolution, with the block's stride.
        *rest: what follows it (a BatchNorm2d), if anything.
    """

    def __init__(self, conv: nn.Conv2d, *rest: nn.Module) -> None:
        super().__init__(conv, *rest)

    def forward(self, x: Tensor) -> Tensor:
        conv, *rest = self
        x = conv1x1_unit_stride(conv, x)
        for module in rest:
            x = module(x)
        return x


# --------------------------------------------------------------------------------------------
# The chapter's block
# --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """The residual block of the D2L chapter (PyTorch tab), unchanged.

    conv1 (3x3, stride ``strides``) -> bn1 -> ReLU -> conv2 (3x3) -> bn2, plus the input
    (through ``conv3``, a 1x1 convolution with stride ``strides``, when ``use_1x1conv``), then ReLU.

    Args:
        input_channels: channels of the input.
        num_channels: channels of the output.
        use_1x1conv: project the shortcut with a 1x1 convolution; needed whenever the
            channels or the resolution change.
        strides: stride of conv1 and conv3; 2 halves height and width.
    """

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3: nn.Conv2d | None = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X: Tensor) -> Tensor:
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = conv1x1_unit_stride(self.conv3, X)  # self.conv3(X), safe with channels_last
        Y += X
        return F.relu(Y)

    def zero_init_last(self) -> None:
        """Zero bn2's scale so the block starts as relu(shortcut)."""
        nn.init.zeros_(self.bn2.weight)


def resnet_block(
    input_channels: int, num_channels: int, num_residuals: int, first_block: bool = False
) -> list[Residual]:
    """One ResNet module of the chapter: a list of ``num_residuals`` Residual blocks.

    The first block of every module but the first halves the resolution and changes the
    channels (1x1 projection, stride 2). As in the chapter it returns a list; wrap it in
    ``nn.Sequential(*...)``.

    Args:
        input_channels: channels entering the module.
        num_channels: channels of every block's output.
        num_residuals: number of Residual blocks.
        first_block: True for the module right after the stem, whose max-pool has already
            halved the resolution, so its first block keeps shape.
    """
    blk: list[Residual] = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


# --------------------------------------------------------------------------------------------
# torchvision-compatible post-activation blocks (He et al. 2016, Table 1)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm; ReLU after the addition (ResNet-18/34).

    Args:
        inplanes: input channels.
        planes: output channels (``expansion`` is 1).
        stride: stride of conv1; 2 halves height and width.
        downsample: the shortcut's projection (``make_shortcut``), or None for the identity.
    """

    expansion: ClassVar[int] = 1
    preact: ClassVar[bool] = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @staticmethod
    def make_shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module:
        """Projection shortcut, torchvision's "option B": 1x1 convolution then BatchNorm.

        Args:
            inplanes: input channels.
            outplanes: output channels of the block.
            stride: stride matching the block's.
        """
        return Projection(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Zero bn2's scale so the block starts as relu(shortcut)."""
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), BatchNorm after each; ReLU after the addition.

    The stride sits on the 3x3 convolution ("ResNet v1.5", as torchvision), not on the first 1x1
    as in the paper: same parameters, slightly more multiply-adds, better accuracy.

    Args:
        inplanes: input channels.
        planes: channels inside the bottleneck; the output has ``planes * 4``.
        stride: stride of conv2; 2 halves height and width.
        downsample: the shortcut's projection (``make_shortcut``), or None for the identity.
    """

    expansion: ClassVar[int] = 4
    preact: ClassVar[bool] = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    make_shortcut = staticmethod(BasicBlock.make_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Zero bn3's scale so the block starts as relu(shortcut)."""
        nn.init.zeros_(self.bn3.weight)


# --------------------------------------------------------------------------------------------
# Full pre-activation units (He et al. 2016b, Fig. 1b/4e)
# --------------------------------------------------------------------------------------------


def _preact_shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module:
    """Projection of a pre-activation unit: a bare 1x1 convolution.

    No BatchNorm: the projection reads the unit's already normalised, activated input (see
    ``PreActBasicBlock``), and the sum is normalised by the next unit's first BN anyway.
    A ``Projection`` (a Sequential) so the key reads ``downsample.0.weight`` like the plain nets'.

    Args:
        inplanes: input channels.
        outplanes: output channels of the unit.
        stride: stride matching the unit's.
    """
    return Projection(conv1x1(inplanes, outplanes, stride))


class PreActBasicBlock(nn.Module):
    """Full pre-activation basic unit: (BN -> ReLU -> 3x3 conv) twice, plus the shortcut.

    Nothing follows the addition: the identity path stays clean from unit to unit, which is
    the point of the paper. When shape changes, the projection is applied to the pre-activated
    input relu(bn1(x)) rather than to x, as in the authors' code (fb.resnet.torch preresnet)
    and timm's ResNetV2; the identity shortcut carries the raw x.

    Args:
        inplanes: input channels (bn1 normalises these).
        planes: output channels (``expansion`` is 1).
        stride: stride of conv1; 2 halves height and width.
        downsample: the projection (``make_shortcut``), or None for the identity.
    """

    expansion: ClassVar[int] = 1
    preact: ClassVar[bool] = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    make_shortcut = staticmethod(_preact_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut

    def zero_init_last(self) -> None:
        """Zero conv2's weight: no BN follows it, so the unit starts as its shortcut (timm does the same)."""
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck: BN -> ReLU -> conv for 1x1, 3x3 (stride), 1x1 (x4).

    Same conventions as ``PreActBasicBlock``: no ReLU after the addition, projection applied
    to the pre-activated input.

    Args:
        inplanes: input channels (bn1 normalises these).
        planes: channels inside the bottleneck; the output has ``planes * 4``.
        stride: stride of conv2; 2 halves height and width.
        downsample: the projection (``make_shortcut``), or None for the identity.
    """

    expansion: ClassVar[int] = 4
    preact: ClassVar[bool] = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    make_shortcut = staticmethod(_preact_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut

    def zero_init_last(self) -> None:
        """Zero conv3's weight so the unit starts as its shortcut."""
        nn.init.zeros_(self.conv3.weight)
