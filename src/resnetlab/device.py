"""Devices, the CPU class, and the precision policy every command obeys.

CPUs of one kind of machine differ: some compute bf16 natively (AVX-512 BF16 or AMX, about 5x
fp32 matmul), others only emulate it (AVX2, AVX-512 without BF16), far slower than fp32. oneDNN
picks its kernels by the class, and ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps it (``AVX2`` gives any x86 CPU
the AVX2 kernels), so the class is read from both.

The policy (docs/training.md, "Precision"):

* training: ``auto`` is bf16 autocast where bf16 is native (CPU class, or a GPU that has it),
  fp32 elsewhere;
* inference (``load_checkpoint``, eval, predict, export's check): fp32 by default on every
  machine, so a checkpoint gives the same probabilities everywhere and matches its ONNX export;
  bf16 is opt-in (``bf16``, or ``auto`` as in training) and said to be slow where it is emulated.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

from resnetlab.errors import UsageError

__all__ = [
    "resolve_device",
    "cpu_flags",
    "cpu_class",
    "bf16_is_native",
    "resolve_precision",
    "autocast_dtype",
    "describe",
    "warn_if_emulated",
    "PRECISIONS",
    "cpu_info",
    "environment",
    "git_commit",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# The CPU classes, from least to most capable; the first two compute bf16 natively.
NATIVE_BF16_CLASSES = ("AMX", "AVX-512 BF16")
# ONEDNN_MAX_CPU_ISA values (oneDNN's names) -> the class they cap the kernels at.
_ISA_CAPS = {
    "SSE41": "baseline",
    "AVX": "baseline",
    "AVX2": "AVX2",
    "AVX2_VNNI": "AVX2",
    "AVX2_VNNI_2": "AVX2",
    "AVX512_CORE": "AVX-512",
    "AVX512_CORE_VNNI": "AVX-512",
    "AVX512_CORE_BF16": "AVX-512 BF16",
    "AVX512_CORE_FP16": "AVX-512 BF16",
    "AVX10_1_512": "AVX-512 BF16",
}
_ORDER = ("baseline", "AVX2", "AVX-512", "AVX-512 BF16", "AMX")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu (the chapter's ``try_gpu``).

    Args:
        name: auto, cpu, cuda, cuda:N or mps.

    Raises:
        UsageError: an unknown device, or one this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device: torch.device | None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    # torch also knows meta, xpu, lazy...: not usable here
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' asked for but MPS is not available here; use --device cpu or auto")
    return device


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def cpu_class() -> str:
    """The class of CPU kernels this process runs: ``AMX``, ``AVX-512 BF16``, ``AVX-512``, ``AVX2``,
    ``baseline`` (older x86), or the machine's architecture elsewhere (e.g. ``aarch64``).

    The hardware's class, capped by ``ONEDNN_MAX_CPU_ISA`` where it is set.
    """
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return machine or "unknown"
    flags = cpu_flags()
    if flags is None:  # not Linux: torch's own dispatch level, which knows no bf16
        hardware = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    elif "amx_bf16" in flags:
        hardware = "AMX"
    elif "avx512_bf16" in flags:
        hardware = "AVX-512 BF16"
    elif "avx512f" in flags:
        hardware = "AVX-512"
    else:
        hardware = "AVX2" if "avx2" in flags else "baseline"
    isa = (
        os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    )  # oneDNN reads both, in this order
    cap = _ISA_CAPS.get(isa.strip().upper(), "AMX")
    return min(hardware, cap, key=_ORDER.index)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (AVX-512 BF16/AMX CPUs, Ampere and newer GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        kind = cpu_class()
        if kind in _ORDER:
            return kind in NATIVE_BF16_CLASSES
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # ARM: oneDNN knows (e.g. Neoverse V1's BF16)
    return False


def resolve_precision(precision: str, device: torch.device, *, inference: bool = False) -> str:
    """The precision a run computes in: ``fp32``, ``bf16`` or ``fp16``.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: where it runs.
        inference: for eval, predict and export (whose default is fp32, not ``auto``).

    Raises:
        UsageError: fp16 on a CPU, or an unknown name.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        what = "fp16 inference" if inference else "fp16 training"
        raise UsageError(f"{what} needs a GPU; use --precision bf16 or fp32 on the CPU")
    return precision


def warn_if_emulated(precision: str, device: torch.device) -> None:
    """Say in one line (stderr) that a resolved ``precision`` is emulated on ``device``, so slower than fp32."""
    if precision == "bf16" and device.type == "cpu" and not bf16_is_native(device):
        print(
            f"resnetlab: warning: this CPU ({cpu_class()}) has no native bf16; it is emulated here, several times "
            "slower than fp32 (--precision fp32 is the fast one)",
            file=sys.stderr,
            flush=True,
        )


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: plain fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def describe(device: torch.device) -> str:
    """What a header line says of a device, e.g. ``cpu (AVX-512 BF16, 2 threads)`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cpu":
        return f"cpu ({cpu_class()}, {torch.get_num_threads()} threads)"
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# ----------------------------------------------------------------------------------------------
# The environment a run or a benchmark records (config.json, benchmark JSON)

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


def git_commit() -> str | None:
    """The commit of the resnetlab source tree, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to put a figure or a run in context: versions, the command, the
    commit, the device, the CPU and its class, the load, the date."""
    from resnetlab import __version__

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    env = {
        "resnetlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        **cpu_info(),
        "git_commit": git_commit(),
        "argv": sys.argv,
        "load_average": load,
        "date": date.today().isoformat(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
