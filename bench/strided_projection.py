"""Training step with the projection shortcuts' stride taken by slicing (the fix for oneDNN issue
6035) against the plain strided 1x1 convolution, interleaved in one run.

    python bench/strided_projection.py                       # fast's model and d2l_resnet18 @96
    python bench/strided_projection.py --precision fp32 --rounds 7

Both variants compute the same function; only the strided variant reaches oneDNN's defective
kernel, which is safe here because every projection's input has >= 16 channels at these widths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from resnetlab.device import autocast_dtype, cpu_class, resolve_precision
from resnetlab.models import blocks, create_model

CASES = {  # name -> (model, options, input side, batch)
    "fast (resnet10 w16 small @24, batch 128)": ("resnet10", {"width": 16, "stem": "small"}, 24, 128),
    "d2l_resnet18 @96, batch 64": ("d2l_resnet18", {}, 96, 64),
}


def step_ms(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
            steps: int) -> float:  # fmt: skip
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    precision = resolve_precision(a.precision, torch.device("cpu"))
    sliced = blocks.conv1x1_unit_stride
    variants = {"sliced": sliced, "strided": lambda conv, x: conv(x)}
    for case, (name, options, side, batch) in CASES.items():
        torch.manual_seed(0)
        net = create_model(name, **options).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x = torch.randn(batch, 1, side, side).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        times: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(a.rounds + 1):
            for variant, fn in variants.items():
                blocks.conv1x1_unit_stride = fn
                ms = step_ms(net, opt, x, y, autocast_dtype(precision), a.steps)
                if round_:  # the first round warms up both
                    times[variant].append(ms)
        blocks.conv1x1_unit_stride = sliced
        med = {v: statistics.median(t) for v, t in times.items()}
        print(json.dumps({"case": case, "cpu_class": cpu_class(), "threads": torch.get_num_threads(), "precision": precision,
                          "ms_per_step": {v: round(m, 1) for v, m in med.items()},
                          "sliced_vs_strided": round(med["strided"] / med["sliced"], 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
