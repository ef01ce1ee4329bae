"""channels_last training is right on every CPU class: oneDNN issue 6035 never reached.

oneDNN's weight gradient of a strided 1x1 convolution on a channels_last input with fewer input
channels than its channel block (8 with AVX2 kernels, 16 with AVX-512) writes past its workspace:
a crash at odd batch sizes with AVX-512 kernels, silently wrong gradients with AVX2 kernels. The
models take the stride by slicing first (``models.blocks.conv1x1_unit_stride``).

Every check runs in a subprocess: without the fix the AVX-512 kernels corrupt the heap, which
would take pytest down with it. Each runs with the machine's own kernels and again with the
AVX2 kernels (``ONEDNN_MAX_CPU_ISA=AVX2`` selects them on any x86 CPU), whichever CPU runs the
suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnetlab.models import create_model, list_models

ISAS = {"native": None, "avx2": "AVX2"}  # ONEDNN_MAX_CPU_ISA for each run
FAMILIES = ["d2l_resnet18", "resnet18", "resnet50", "preact_resnet18", "preact_resnet50"]


def _run(script: str, args: list[str], isa: str | None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # the AVX2 kernel has also been seen spinning forever on this defect
        pytest.fail(f"the subprocess hung for {timeout} s (ONEDNN_MAX_CPU_ISA={isa})")


def _died(proc: subprocess.CompletedProcess[str]) -> str:
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"subprocess died ({how}):\n{proc.stderr[-3000:]}"


# The parameter gradients of one training step in channels_last and in NCHW, fp32, as
# {name: relative max difference} per batch size.
GRADIENTS = """
import json, sys, torch
from resnetlab.models import create_model
from resnetlab.models.blocks import Residual

def build(spec):
    if spec == "Residual":
        return Residual(3, 6, use_1x1conv=True, strides=2), 3
    name, width = spec.split(":")
    return create_model(name, in_chans=1, stem="small", width=int(width)), 1

def grads(net, x, g, fmt):
    net.zero_grad(set_to_none=True)
    net.to(memory_format=fmt)
    (net(x.contiguous(memory_format=fmt)) * g).sum().backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}

out = {}
for spec in sys.argv[1:]:
    for batch in (2, 3, 4):
        torch.manual_seed(0)
        net, chans = build(spec)
        # BatchNorm in eval mode: the same convolution gradients, and a comparison at rounding level.
        # In training mode a conv bias before a BN has an exactly-zero gradient (rounding noise), and
        # a BN normalising 2 images of a 2x2 map amplifies rounding by orders of magnitude.
        net.eval()
        x = torch.randn(batch, chans, 16, 16)
        g = torch.randn_like(net(x))
        ref = grads(net, x, g, torch.contiguous_format)
        got = grads(net, x, g, torch.channels_last)
        out[f"{spec} batch {batch}"] = {k: ((got[k] - r).abs().max() / r.abs().max()).item() for k, r in ref.items()}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("family", [*FAMILIES, "Residual"])
def test_channels_last_gradients_equal_nchw(family: str, isa: str) -> None:
    specs = ["Residual"] if family == "Residual" else [f"{family}:{w}" for w in (4, 8, 12)]
    proc = _run(GRADIENTS, specs, ISAS[isa])
    assert proc.returncode == 0, _died(proc)
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    worst = {case: max(per_param.items(), key=lambda kv: kv[1]) for case, per_param in errors.items()}
    wrong = {case: f"{name}: {err:.2g}" for case, (name, err) in worst.items() if not err <= 1e-4}
    assert not wrong, f"channels_last gradients differ from NCHW by more than 1e-4 relative: {wrong}"


class _StridedPointwiseConvs(TorchDispatchMode):
    """Records every convolution (forward or backward) with a 1x1 kernel and a stride above 1."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            forward = (
                func is torch.ops.aten.convolution.default
            )  # (input, weight, bias, stride...) / (grad, input, weight, ..., stride...)
            weight, stride = (args[1], args[3]) if forward else (args[2], args[4])
            if tuple(weight.shape[-2:]) == (1, 1) and any(s > 1 for s in stride):
                self.seen.append(f"{func} weight {tuple(weight.shape)} stride {tuple(stride)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list_models())
def test_no_strided_1x1_convolution_reaches_aten(name: str) -> None:
    """A future block cannot bring the defective path back: no 1x1 convolution with a stride above 1
    reaches aten.convolution during a channels_last training step of any registered model."""
    torch.manual_seed(0)
    net = create_model(name, stem="small", width=8).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)  # an even batch: no crash either way
    with _StridedPointwiseConvs() as mode:
        net(x).sum().backward()
    assert not mode.seen, f"{name} runs strided 1x1 convolutions (oneDNN issue 6035): {mode.seen[:3]}"
    assert all(p.grad is not None for p in net.parameters())


# Training steps in channels_last at odd batch sizes: these corrupted the heap with AVX-512 kernels.
ODD_BATCHES = """
import sys, torch
from resnetlab.models import create_model
for name in ("resnet10", "preact_resnet10", "d2l_resnet18"):
    for width in (8, 12):
        torch.manual_seed(0)
        net = create_model(name, stem="small", width=width).train().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for batch in (1, 3, 5):
            x = torch.randn(batch, 1, 16, 16).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[1] == "bf16"):
                loss = net(x).float().logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss), (name, width, batch)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_training_steps_at_odd_batches(precision: str, isa: str) -> None:
    proc = _run(ODD_BATCHES, [precision], ISAS[isa])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", _died(proc)
