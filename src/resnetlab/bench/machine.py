"""What machine a benchmark ran on, and what its matrix units can do (measured, not assumed).

``matmul_peak_gflops`` times a few large square matrix products in fp32 and bf16 in the running
process, so every benchmark reports its throughput as a fraction of *this* machine's peaks. On a
CPU without native bf16 (no AVX512-BF16 / AMX) the bf16 "peak" is far below the fp32 one: bf16 is
emulated and slower, which is why ``precision="auto"`` trains in fp32 there.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from datetime import date
from typing import Any, Iterator

import torch

from resnetlab.device import bf16_is_native, cpu_class, cpu_flags

# CPU flags that decide which precisions are fast
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """CPU model, cores and the flags that matter, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), cpu_flags() or set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    model = value.strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_class": cpu_class(),
        "bf16_native": bf16_is_native(torch.device("cpu")),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to put a figure in context."""
    info = cpu_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"device": str(device), **info, "torch": torch.__version__, "python": platform.python_version(),
            "load_average": load, "date": date.today().isoformat()}  # fmt: skip


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_peak_gflops(n: int, dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """Best-of-``reps`` GFLOP/s of one n x n @ n x n product (2 n^3 FLOPs), after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def peaks(device: torch.device, fp32_size: int = 2048, bf16_size: int = 512) -> dict[str, Any]:
    """fp32 and bf16 matmul peaks of this device, measured now. bf16 is kept small: it may be emulated."""
    fp32 = matmul_peak_gflops(fp32_size, torch.float32, device, reps=3)
    bf16 = matmul_peak_gflops(bf16_size, torch.bfloat16, device, reps=2)
    return {"fp32_peak_gflops": round(fp32, 2), "bf16_peak_gflops": round(bf16, 2),
            "bf16_over_fp32_peak": round(bf16 / fp32, 4), "peak_sizes": {"fp32": fp32_size, "bf16": bf16_size}}  # fmt: skip


def training_flops_per_image(net: torch.nn.Module, in_chans: int, size: int, device: torch.device) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per image, counted by ``FlopCounterMode`` on a real step.

    Convolutions and matrix products only (the usual convention). The backward is a little under
    twice the forward because the first convolution needs no gradient for its input.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.train()
    x = torch.rand(2, in_chans, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x)
    forward = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        out.float().sum().backward()
    backward = counter.get_total_flops()
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return forward // 2, (forward + backward) // 2
