"""BatchNorm whose training statistics cover the global batch of all ranks, on the CPU (gloo).

PyTorch's ``SyncBatchNorm`` runs on GPUs only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as td
from torch import nn

from resnetlab.train.dist import active

__all__ = ["CpuSyncBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of every rank's copy is summed back to each input."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        td.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks, over gloo.

    The state dict is BatchNorm2d's, key for key, so checkpoints load into the plain model. Each
    rank computes its shard's mean and variance, one all-reduce sums (count, sum, sum of squares)
    in float64, and autograd carries the gradient back through the same all-reduce: the result
    equals one process normalising the whole global batch. Outside training, or without a process
    group, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active() and td.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 under autocast: statistics in fp32
        c = xf.shape[1]
        n_local = xf.numel() // c
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean_l, var_l = mean_l.double(), var_l.double()
        count = torch.full((1,), float(n_local), dtype=torch.float64, device=xf.device)
        stats = _AllReduceSum.apply(torch.cat([count, mean_l * n_local, (var_l + mean_l * mean_l) * n_local]))
        n = stats[0]
        mean = stats[1 : 1 + c] / n
        var = (stats[1 + c :] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps).to(xf.dtype)
        shift = -mean.to(xf.dtype) * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        y = xf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> batch statistics over all ranks: PyTorch's SyncBatchNorm on GPUs, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return _convert_cpu(net)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        # Like nn.SyncBatchNorm.convert_sync_batchnorm: the same parameters and buffers, re-homed.
        new = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, device="meta"
        )
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = _convert_cpu(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
