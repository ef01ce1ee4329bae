"""A data-initialised first convolution: its filters whiten the input's patches (airbench's stem).

The first convolution's filters are set to the eigenvectors of the covariance of the training
images' patches, each divided by the square root of its eigenvalue, so that the stem's outputs
are decorrelated and of unit variance from the first step; each filter comes with its negation,
so that the ReLU after the BatchNorm keeps both signs. The whitened filters are then frozen: they
are already the best first layer for the data, and training them costs accuracy
(docs/performance.md). The remaining filters, if the layer has more than twice the patch size,
keep their initialisation and train.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["first_conv", "freeze_whitened_filters", "whiten_first_conv", "whitened_filters"]

# The 3x3 patches of 5,000 Fashion-MNIST images at 28 px: the covariance of a small patch is settled
# well before this, and the sum costs well under a second; larger images stop after fewer images.
MAX_PATCHES = 5000 * 28 * 28
# Added to every eigenvalue, in units of the normalised input's variance: it bounds the gain of
# the directions the data barely spans (airbench uses the same order of magnitude).
EIGENVALUE_EPS = 5e-4


def first_conv(net: nn.Module) -> nn.Conv2d:
    """The network's first 2-d convolution (in module order)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(net).__name__} has no Conv2d to whiten")
    return conv


def whitened_filters(conv: nn.Conv2d) -> int:
    """How many of ``conv``'s filters whitening sets (and freezes): twice the number of
    eigenvectors used, which is the patch size or half the filters, whichever is smaller."""
    kh, kw = conv.kernel_size
    return 2 * min(conv.out_channels // 2, conv.in_channels // conv.groups * kh * kw)


@torch.no_grad()
def whiten_first_conv(
    net: nn.Module, batches: Iterable[torch.Tensor], max_patches: int = MAX_PATCHES, chunk_bytes: int = 64 << 20
) -> int:
    """Set the first convolution's leading filters to the whitening basis of the inputs' patches.

    Args:
        net: the network; its first Conv2d must have ``groups=1``.
        batches: float model inputs (N, C, H, W), preprocessed as the network sees them; read
            lazily, and only until ``max_patches`` patches are summed.
        max_patches: patches to estimate the covariance from.
        chunk_bytes: the most memory one step of the sum unfolds, so large images stay in bounds.

    Returns:
        the number of filters set (see :func:`whitened_filters`).
    """
    conv = first_conv(net)
    if conv.groups != 1:
        raise ValueError("whitening needs a first convolution with groups=1")
    n = whitened_filters(conv) // 2
    if n == 0:
        return 0
    dim = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    chunks = (c for b in batches for c in b.split(max(1, chunk_bytes // (8 * dim * b[0, 0].numel()))))
    for images in chunks:
        # the patches the convolution sees, borders with their zero padding included
        patches = F.unfold(
            images.float().cpu(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        )
        patches = patches.transpose(1, 2).reshape(-1, dim)[: max_patches - count].double()
        cov += patches.T @ patches
        count += len(patches)
        if count == max_patches:
            break
    if count == 0:
        raise ValueError("whitening needs at least one image")
    # about the origin, not the mean: the inputs are normalised, and BatchNorm removes the rest
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / count)
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:n], eigenvectors.flip(1)[:, :n]  # the largest first
    basis = (eigenvectors / (eigenvalues.clamp_min(0) + EIGENVALUE_EPS).sqrt()).T
    basis = basis.reshape(n, conv.in_channels, *conv.kernel_size).to(conv.weight)
    conv.weight[:n] = basis
    conv.weight[n : 2 * n] = -basis
    if conv.bias is not None:
        conv.bias[: 2 * n] = 0
    return 2 * n


def freeze_whitened_filters(net: nn.Module) -> None:
    """Zero the gradient of the whitened filters at every backward pass, so that they stay exact.

    Frozen only where the optimizer adds nothing of its own: the caller keeps the first
    convolution out of weight decay. The gradient is cloned, not rebuilt, so that it keeps the
    weight's memory format (torch's fused CPU optimizers ignore strides).
    """
    conv = first_conv(net)
    n = whitened_filters(conv)

    def zero_whitened(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n] = 0
        return grad

    conv.weight.register_hook(zero_whitened)
    if conv.bias is not None:
        conv.bias.register_hook(zero_whitened)
