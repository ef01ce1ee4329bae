"""``resnetlab bench strided-projection``: training step with the projection shortcuts' stride taken
by slicing (the fix for oneDNN issue 6035) against the plain strided 1x1 convolution, interleaved in
one run.

    resnetlab bench strided-projection                       # fast's model and d2l_resnet18 @96
    resnetlab bench strided-projection --precision fp32 --rounds 7

Both variants compute the same function; only the strided variant reaches oneDNN's defective
kernel, which is safe here because every projection's input has >= 16 channels at these widths.
Prints one JSON object per case (the CPU class in each).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from resnetlab.bench.machine import round_robin
from resnetlab.device import autocast_dtype, cpu_class, resolve_precision
from resnetlab.errors import UsageError
from resnetlab.models import blocks, create_model

CASES = {  # --cases name -> (printed name, model, options, input side, batch)
    "fast": ("fast (resnet10 w16 small @24, batch 128)", "resnet10", {"width": 16, "stem": "small"}, 24, 128),
    "d2l": ("d2l_resnet18 @96, batch 64", "d2l_resnet18", {}, 96, 64),
}


def train_steps(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    steps: int,
) -> None:
    """``steps`` training steps of ``net`` on the one batch ``(x, y)``, under autocast to ``dtype`` (None: fp32)."""
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def time_case(
    name: str, options: dict, side: int, batch: int, dtype: torch.dtype | None, rounds: int, steps: int
) -> dict[str, float]:
    """Median milliseconds per training step of each variant, ``rounds`` interleaved rounds after one of warm-up."""
    torch.manual_seed(0)
    net = create_model(name, **options).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 1, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    sliced = blocks.conv1x1_unit_stride
    variants = {"sliced": sliced, "strided": lambda conv, x: conv(x)}

    def run(fn: object) -> None:
        blocks.conv1x1_unit_stride = fn
        train_steps(net, opt, x, y, dtype, steps)

    try:
        seconds = round_robin({v: (lambda fn=fn: run(fn)) for v, fn in variants.items()}, rounds, warmup=1)
    finally:
        blocks.conv1x1_unit_stride = sliced
    return {v: statistics.median(s) / steps * 1000 for v, s in seconds.items()}


def run_strided_projection_bench(args: argparse.Namespace) -> int:
    """Print one JSON object per case: ms per step of both variants and their ratio.

    Args:
        args: the parsed flags of ``resnetlab bench strided-projection``: ``precision``, ``rounds``,
            ``steps`` and ``cases`` (a comma list of ``fast``, ``d2l``).

    Returns:
        0.
    """
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        raise UsageError(f"--cases takes a comma list of {', '.join(CASES)}, not {args.cases!r}")
    precision = resolve_precision(args.precision, torch.device("cpu"))
    for key in names:
        case, name, options, side, batch = CASES[key]
        med = time_case(name, options, side, batch, autocast_dtype(precision), args.rounds, args.steps)
        print(
            json.dumps(
                {
                    "case": case,
                    "cpu_class": cpu_class(),
                    "threads": torch.get_num_threads(),
                    "precision": precision,
                    "ms_per_step": {v: round(m, 1) for v, m in med.items()},
                    "sliced_vs_strided": round(med["strided"] / med["sliced"], 3),
                }
            )
        )
    return 0
