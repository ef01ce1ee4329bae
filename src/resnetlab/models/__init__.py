"""Residual networks: the D2L chapter's ResNet-18 and the He et al. family, built from a registry.

>>> from resnetlab.models import create_model, list_models
>>> model = create_model("d2l_resnet18")          # 1 channel, 10 classes, as the chapter
>>> model = create_model("resnet50", num_classes=1000, in_chans=3)   # torchvision layout
>>> model = create_model("preact_resnet18", stem="small", width=32)  # 28-32 px inputs
"""

from __future__ import annotations

from resnetlab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Residual,
    resnet_block,
)
from resnetlab.models.fold import fold_batchnorm
from resnetlab.models.registry import MODELS, ModelConfig, create_model, list_models
from resnetlab.models.resnet import ResNet, d2l_resnet
from resnetlab.models.summary import (
    check_input_size,
    count_macs,
    count_parameters,
    layer_shapes,
    min_input_size,
)
from resnetlab.models.whiten import first_conv, freeze_whitened_filters, whiten_first_conv, whitened_filters

__all__ = [
    "Residual",
    "resnet_block",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "d2l_resnet",
    "create_model",
    "fold_batchnorm",
    "list_models",
    "MODELS",
    "ModelConfig",
    "count_parameters",
    "count_macs",
    "layer_shapes",
    "min_input_size",
    "check_input_size",
    "first_conv",
    "freeze_whitened_filters",
    "whiten_first_conv",
    "whitened_filters",
]
