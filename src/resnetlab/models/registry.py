"""The model registry: every variant is a small configuration entry; one builder makes them all.

Names: ``d2l_resnet18`` (the chapter's net), ``resnet{10,18,34,50,101,152}`` (He et al. 2016,
Table 1, torchvision layout) and ``preact_resnet{...}`` (the same depths with full
pre-activation units, He et al. 2016b). ``resnet10`` ([1, 1, 1, 1] basic blocks, timm's
resnet10t depth) is there for fast small-image training.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from resnetlab.errors import UsageError
from resnetlab.models.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from resnetlab.models.resnet import BlockType, ResNet, d2l_resnet

__all__ = ["ModelConfig", "MODELS", "OPTIONS", "create_model", "list_models", "get_config"]


@dataclass(frozen=True)
class ModelConfig:
    """One registered variant.

    Args:
        block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with expansion 4).
        layers: blocks per stage (layer1..layer4, or the chapter's b2..b5).
        preact: use full pre-activation units.
        d2l: build the chapter's ``nn.Sequential`` with its ``Residual`` (conv bias, no BN on
            the projection) instead of the torchvision-layout ``ResNet``.
    """

    block: Literal["basic", "bottleneck"]
    layers: tuple[int, int, int, int]
    preact: bool = False
    d2l: bool = False

    @property
    def block_class(self) -> BlockType:
        """The block class ``ResNet`` is built from."""
        return {
            ("basic", False): BasicBlock,
            ("bottleneck", False): Bottleneck,
            ("basic", True): PreActBasicBlock,
            ("bottleneck", True): PreActBottleneck,
        }[(self.block, self.preact)]

    def describe(self) -> str:
        """Short text for tables, e.g. "preact bottleneck [3, 4, 6, 3]"."""
        kind = "d2l Residual" if self.d2l else ("preact " if self.preact else "") + self.block
        return f"{kind} {list(self.layers)}"


# He et al. 2016, Table 1 (plus the shallow [1, 1, 1, 1] used by fast small-image recipes).
_DEPTHS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

MODELS: dict[str, ModelConfig] = {"d2l_resnet18": ModelConfig("basic", (2, 2, 2, 2), d2l=True)}
MODELS.update({f"resnet{d}": ModelConfig(block, layers) for d, (block, layers) in _DEPTHS.items()})
MODELS.update({f"preact_resnet{d}": ModelConfig(block, layers, preact=True) for d, (block, layers) in _DEPTHS.items()})

# Options every variant takes, with their defaults (num_classes and in_chans are create_model's).
OPTIONS: dict[str, Any] = {"stem": "imagenet", "width": 64, "max_width": None, "zero_init_residual": False}


def list_models() -> list[str]:
    """Registered model names, in registry order (chapter net, plain, pre-activation)."""
    return list(MODELS)


def _suggest(word: str, choices: list[str]) -> list[str]:
    return difflib.get_close_matches(word, choices, n=3, cutoff=0.6)


def get_config(name: str) -> tuple[str, ModelConfig]:
    """Look a name up (case and surrounding spaces ignored); returns (canonical name, config).

    Args:
        name: a registered model name.

    Raises:
        UsageError: unknown name, with the closest registered names.
    """
    if not isinstance(name, str):
        raise UsageError(f"model name must be a string, got {name!r}; see `resnetlab models`")
    key = name.strip().lower()
    if key in MODELS:
        return key, MODELS[key]
    close = _suggest(key, list_models())
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(list_models())}"
    raise UsageError(f"unknown model {name!r}; {hint} (see `resnetlab models`)")


def create_model(name: str, num_classes: int = 10, in_chans: int = 1, **options: Any) -> nn.Module:
    """Build a registered model with fresh weights.

    The result carries ``model.name`` (the registry name) and ``model.options`` (the resolved,
    JSON-serialisable options) so that ``create_model(model.name, **model.options)`` rebuilds it.

    Args:
        name: a registered name, see ``list_models()``.
        num_classes: outputs of the classifier (10 for Fashion-MNIST).
        in_chans: input channels (1 for grayscale).
        **options: ``stem`` ("imagenet" or "small"), ``width`` (base channels, default 64),
            ``max_width`` (the most channels a stage has, default None: no cap),
            ``zero_init_residual`` (bool, default False).

    Raises:
        UsageError: unknown name (with suggestions), unknown option or meaningless value.
    """
    canonical, cfg = get_config(name)
    for key in options:
        if key not in OPTIONS:
            valid = ["num_classes", "in_chans", *OPTIONS]
            close = _suggest(key, valid)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"unknown option {key!r} for {canonical}; {hint}valid options: {', '.join(valid)}")
    resolved = {**OPTIONS, **options}
    if cfg.d2l:
        model: nn.Module = d2l_resnet(cfg.layers, num_classes=num_classes, in_chans=in_chans, **resolved)
    else:
        model = ResNet(cfg.block_class, cfg.layers, num_classes=num_classes, in_chans=in_chans, **resolved)
    model.name = canonical
    return model
