"""resnetlab: residual networks, from the D2L chapter's ResNet-18 to the whole family.

Public names are loaded lazily (PEP 562) so that light commands, such as
``resnetlab predict --onnx``, run without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # models
    "Residual": "resnetlab.models",
    "resnet_block": "resnetlab.models",
    "BasicBlock": "resnetlab.models",
    "Bottleneck": "resnetlab.models",
    "PreActBasicBlock": "resnetlab.models",
    "PreActBottleneck": "resnetlab.models",
    "ResNet": "resnetlab.models",
    "create_model": "resnetlab.models",
    "list_models": "resnetlab.models",
    # data
    "load_dataset": "resnetlab.data",
    "Split": "resnetlab.data",
    "BatchLoader": "resnetlab.data",
    # training and use
    "train": "resnetlab.train",
    "RunResult": "resnetlab.train",
    "load_checkpoint": "resnetlab.inference",
    "load_pretrained": "resnetlab.models.pretrained",
    # errors
    "ResnetlabError": "resnetlab.errors",
    "UsageError": "resnetlab.errors",
    "DataError": "resnetlab.errors",
    "CheckpointError": "resnetlab.errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'resnetlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
