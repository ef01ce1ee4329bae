"""``resnetlab bench conv-backward``: where a recipe's convolution backward goes: forward vs input
gradient vs weight gradient, per layer.

    resnetlab bench conv-backward                  # the fast recipe's convolutions at batch 128, 24 px
    resnetlab bench conv-backward --recipe d2l --batch-size 32

On the development CPU (AVX2, 2 cores) a `fast` step's backward takes ~2.4x its forward; this shows
which half is slow. For each 3x3 convolution it also times the weight gradient computed another
way, as im2col + one GEMM (the classic formulation), to see whether replacing oneDNN's kernel would
pay. Times are medians of repeated calls in one process, in ms.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.bench.machine import cpu_line, round_robin
from resnetlab.device import cpu_info
from resnetlab.models import create_model
from resnetlab.train import get_recipe


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn``, after one untimed call (oneDNN creates its primitive then)."""
    return statistics.median(round_robin({"fn": fn}, reps, warmup=1)["fn"]) * 1000


def weight_grad_im2col(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """dL/dW of a KxK convolution (padding (K-1)/2, no groups or dilation) as im2col + GEMM on NHWC data."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    ho, wo = grad.shape[-2:]
    xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # N, H, W, C views of channels_last memory
    cols = torch.stack(
        [xp[:, i : i + (ho - 1) * s + 1 : s, j : j + (wo - 1) * s + 1 : s] for i in range(k) for j in range(k)], dim=3
    )
    g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return (g.t() @ cols.reshape(g.shape[0], -1)).view(grad.shape[1], k, k, x.shape[1]).permute(0, 3, 1, 2)


def time_conv(conv: nn.Conv2d, shape: torch.Size, batch: int, reps: int) -> dict[str, float]:
    """Forward, input-gradient and weight-gradient times of ``conv`` on a random NHWC batch, in ms."""
    x = torch.randn(batch, *shape[1:]).contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach().clone()
    g = torch.randn_like(F.conv2d(x, w, stride=conv.stride, padding=conv.padding))

    def grads(mask: list[bool]) -> tuple[torch.Tensor, ...]:
        return torch.ops.aten.convolution_backward(
            g, x, w, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], 1, mask
        )

    t = {
        "forward": median_ms(lambda: F.conv2d(x, w, stride=conv.stride, padding=conv.padding), reps),
        "grad in": median_ms(lambda: grads([True, False, False]), reps)
        if shape[1] > 1
        else 0.0,  # the stem's input needs none
        "grad W": median_ms(lambda: grads([False, True, False]), reps),
        "im2col W": float("nan"),
    }
    if conv.kernel_size[0] > 1:
        ref = grads([False, True, False])[1]
        assert (weight_grad_im2col(g, x, conv) - ref).abs().max() <= 1e-4 * ref.abs().max(), (
            "im2col weight gradient is wrong"
        )
        t["im2col W"] = median_ms(lambda: weight_grad_im2col(g, x, conv), reps)
    t["best W"] = min(t["grad W"], t["im2col W"]) if conv.kernel_size[0] > 1 else t["grad W"]
    return t


def conv_inputs(net: nn.Module, size: int) -> dict[nn.Conv2d, torch.Size]:
    """Each convolution of ``net`` -> the shape of its input on a 1-channel ``size`` x ``size`` batch of 2."""
    inputs: dict[nn.Conv2d, torch.Size] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, i: inputs.update({m: i[0].shape}))
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    net(torch.zeros(2, 1, size, size).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return inputs


def run_conv_backward_bench(args: argparse.Namespace) -> int:
    """Print, per convolution of the recipe's model, forward and backward milliseconds and their totals.

    Args:
        args: the parsed flags of ``resnetlab bench conv-backward``: ``recipe``, ``batch_size`` (None:
            the recipe's) and ``reps``.

    Returns:
        0.
    """
    r = get_recipe(args.recipe)
    batch = args.batch_size or r.batch_size
    size = r.resize or 28
    net = create_model(r.model, num_classes=10, in_chans=1, **r.model_options()).to(memory_format=torch.channels_last)
    inputs = conv_inputs(net, size)

    print(cpu_line(cpu_info()))
    print(
        f"{args.recipe}: {r.model}, batch {batch}, {size} px, {torch.get_num_threads()} threads; "
        f"ms per call (median of {args.reps})"
    )
    print(f"{'convolution':<28}{'forward':>9}{'grad in':>9}{'grad W':>9}{'W/fwd':>7}{'im2col W':>10}")
    timed: dict[tuple, dict[str, float]] = {}  # a layer shape seen twice (layer1's two convolutions) is timed once
    totals = dict.fromkeys(("forward", "grad in", "grad W", "best W"), 0.0)
    for conv, shape in inputs.items():
        key = (tuple(shape[1:]), conv.out_channels, conv.kernel_size, conv.stride)
        if key not in timed:
            t = timed[key] = time_conv(conv, shape, batch, args.reps)
            name = (
                f"{shape[1]}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]} "
                f"@{shape[-1]}px"
            )
            print(
                f"{name:<28}{t['forward']:9.2f}{t['grad in']:9.2f}{t['grad W']:9.2f}"
                f"{t['grad W'] / t['forward']:7.1f}{t['im2col W']:10.2f}"
            )
        totals = {k: v + timed[key][k] for k, v in totals.items()}
    print(
        f"{'all ' + str(len(inputs)) + ' convolutions':<28}{totals['forward']:9.2f}{totals['grad in']:9.2f}"
        f"{totals['grad W']:9.2f}{totals['grad W'] / totals['forward']:7.1f}{totals['best W']:10.2f}"
        "  (last: the faster weight gradient per layer)"
    )
    return 0
