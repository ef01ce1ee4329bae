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
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resnetlab.models.blocks import Projection

__all__ = ["fold_batchnorm"]


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with each Conv2d -> BatchNorm2d pair folded into one Conv2d.

    Args:
        net: any model of the registry (traceable by torch.fx); it is not changed.
    """
    from torch.fx.experimental.optimization import fuse

    plain = copy.deepcopy(net).eval()
    _plain_batchnorm(plain)
    _fold_projections(plain)
    folded = fuse(plain, inplace=True)
    # fuse() keeps the parameters' values, not their memory format: keep the network's
    if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in net.parameters()):
        folded = folded.to(memory_format=torch.channels_last)
    return folded.eval()


def _plain_batchnorm(net: nn.Module) -> None:
    """Replace, in place, each other BatchNorm of images (torch's SyncBatchNorm, the CPU one of distributed
    runs) by a plain BatchNorm2d with its state. fuse() folds only that exact type, and fx traces into
    modules outside torch.nn, where BatchNorm's shape check is control flow it cannot trace. In eval mode
    these are plain BatchNorm2d, so the folded result is the same."""
    for name, child in net.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)) and type(child) is not nn.BatchNorm2d:
            state = child.state_dict()
            plain = nn.BatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                device=next(iter(state.values())).device if state else None,
            )
            plain.load_state_dict(state)
            setattr(net, name, plain.eval())
        else:
            _plain_batchnorm(child)


def _fold_projections(net: nn.Module) -> None:
    """Fold, in place, the BatchNorm of each projection shortcut into its 1x1 convolution. fuse() sees
    only a call of a Conv2d module followed by a BatchNorm2d; a projection's convolution runs through
    ``conv1x1_unit_stride`` (a training-time fix, the same function) as a functional call."""
    for module in net.modules():
        if isinstance(module, Projection) and len(module) == 2 and type(module[1]) is nn.BatchNorm2d:
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            del module[1]
