"""What machine a benchmark ran on, and what its matrix units can do (measured, not assumed).

``matmul_peak_gflops`` times a few large square matrix products in fp32 and bf16 in the running
process, so every benchmark reports its throughput as a fraction of *this* machine's peaks. On a
CPU without native bf16 (no AVX512-BF16 / AMX) the bf16 "peak" is far below the fp32 one: bf16 is
emulated and slower, which is why ``precision="auto"`` trains in fp32 there.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch


def cpu_line(info: dict[str, Any]) -> str:
    """The line every benchmark prints first: the CPU, the class of kernels it runs and torch's threads.

    Args:
        info: :func:`cpu_info` or :func:`environment` of this process.

    Returns:
        e.g. ``cpu: Intel(R) Xeon(R) Platinum 8480+ (AMX), 2 threads``.
    """
    threads = info["threads"]
    return f"cpu: {info['cpu']} ({info['cpu_class']}), {threads} thread{'' if threads == 1 else 's'}"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


K = TypeVar("K")


def round_robin(
    calls: dict[K, Callable[[], object]], rounds: int, device: torch.device | None = None, warmup: int = 0
) -> dict[K, list[float]]:
    """Time each of ``calls`` once per round, in turn, so that machine load hits all of them alike.

    Unlike :func:`resnetlab.bench.engines.interleaved` (training steps, the first side alternating),
    the order is the same every round.

    Args:
        calls: name -> a call with no arguments.
        rounds: timed rounds.
        device: synchronised after each call (and after the warm-up) before the clock is read.
        warmup: untimed rounds first.

    Returns:
        name -> the seconds of each timed call, ``rounds`` of them.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    if device is not None:
        synchronize(device)
    seconds: dict[K, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if device is not None:
                synchronize(device)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


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
    return {
        "fp32_peak_gflops": round(fp32, 2),
        "bf16_peak_gflops": round(bf16, 2),
        "bf16_over_fp32_peak": round(bf16 / fp32, 4),
        "peak_sizes": {"fp32": fp32_size, "bf16": bf16_size},
    }


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
