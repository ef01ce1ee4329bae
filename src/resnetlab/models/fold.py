"""BatchNorm folded into the convolution before it, for evaluation.

In eval mode a BatchNorm after a convolution is an affine map per channel, which the convolution's
weights and a bias absorb: one kernel instead of two and no pass over the activations in between.
Logits change by rounding only. Pre-activation blocks (BatchNorm before their convolutions) fold only
where a convolution is followed by a BatchNorm.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorm"]


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with each Conv2d -> BatchNorm2d pair folded into one Conv2d.

    Args:
        net: any model of the registry (traceable by torch.fx); it is not changed.
    """
    from torch.fx.experimental.optimization import fuse

    folded = fuse(copy.deepcopy(net).eval(), inplace=True)
    # fuse() keeps the parameters' values, not their memory format: keep the network's
    if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in net.parameters()):
        folded = folded.to(memory_format=torch.channels_last)
    return folded.eval()
