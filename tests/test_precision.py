"""The precision policy, on both paths whatever CPU runs the suite.

Training: ``auto`` is bf16 where the CPU computes it natively, fp32 elsewhere; the header and
config.json name the CPU class and the precision. Inference (eval, predict, load_checkpoint,
export's check) is fp32 by default, so a checkpoint gives the same results on every CPU, matches
its ONNX export, and ``resnetlab eval`` reproduces the accuracy the run printed.

Every run here forces its precision: no test assumes what ``auto`` picks on this machine. bf16
is emulated (slow) on AVX2-only CPUs, so the models are tiny.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetlab import device as device_mod
from resnetlab.cli import main
from resnetlab.train import load_checkpoint, train

TINY = dict(
    model="resnet10", width=8, subset=512, batch_size=64, epochs=2, eval_every=1, resize=16, tta=True, progress=False
)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = train("fast", out=out, precision=request.param, **TINY)
    return request.param, result, stdout.getvalue()


# ----------------------------------------------------------------------------------------------
# The CPU class and auto


@pytest.mark.parametrize(
    "flags, isa, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, None, "AMX"),
        ({"avx2", "avx512f", "avx512_bf16"}, None, "AVX-512 BF16"),
        ({"avx2", "avx512f"}, None, "AVX-512"),
        ({"avx2"}, None, "AVX2"),
        ({"sse4_2"}, None, "baseline"),
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", "AVX2"),  # ONEDNN_MAX_CPU_ISA caps the kernels
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "avx512_core", "AVX-512"),
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", "AVX-512 BF16"),
        ({"avx2"}, "AVX512_CORE_AMX", "AVX2"),  # a cap never raises the class
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "DNNL_MAX_CPU_ISA=AVX2", "AVX2"),  # oneDNN's older name
    ],
)
def test_cpu_class_and_auto(flags: set[str], isa: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa is not None:
        name, _, value = isa.rpartition("=")
        monkeypatch.setenv(name or "ONEDNN_MAX_CPU_ISA", value)
    cpu = torch.device("cpu")
    assert device_mod.cpu_class() == expected
    native = expected in ("AMX", "AVX-512 BF16")
    assert device_mod.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert device_mod.resolve_precision("fp32", cpu) == "fp32" and device_mod.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.skipif(
    device_mod.cpu_flags() is None or device_mod.platform.machine() != "x86_64",
    reason="the class is read from /proc/cpuinfo on x86 Linux",
)
def test_this_machine_has_a_class_that_matches_oneDNN() -> None:
    """The class read from the CPU flags agrees with oneDNN's own view of bf16."""
    kind = device_mod.cpu_class()
    # oneDNN also calls AVX-512 without BF16 "supported" (emulated), so one way only
    if kind in ("AMX", "AVX-512 BF16"):
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_header_and_config_name_the_class_and_the_precision(run) -> None:
    precision, result, stdout = run
    kind = device_mod.cpu_class()
    threads = torch.get_num_threads()
    expected = (
        f"training on cpu ({kind}, {threads} threads): "
        f"{precision}{' autocast' if precision == 'bf16' else ''}, channels_last"
    )
    assert stdout.splitlines()[0] == expected
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["precision"] == precision and config["cpu_class"] == kind


# ----------------------------------------------------------------------------------------------
# Inference is fp32 by default: eval reproduces the run, probabilities are the same everywhere


def test_eval_reproduces_the_accuracy_the_run_printed_and_stored(run, capsys: pytest.CaptureFixture[str]) -> None:
    precision, result, stdout = run
    printed = next(line for line in stdout.splitlines() if line.startswith("loss "))
    stored = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]  # the epoch row
    assert main(["eval", str(result.run_dir), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert measured == stored == result.test_acc  # exactly: the last test pass ran in fp32, as eval does
    assert printed.endswith(f"test acc {measured:.3f}")


def test_load_checkpoint_is_fp32_unless_asked(run) -> None:
    precision, result, _ = run
    assert load_checkpoint(result.run_dir).precision == "fp32"
    assert load_checkpoint(result.run_dir, precision="bf16").precision == "bf16"
    assert read_meta(result.run_dir)["train_precision"] == precision


def read_meta(run_dir: Path) -> dict:
    from resnetlab.checkpoint import read_checkpoint

    return read_checkpoint(run_dir)[1]


PROBABILITIES = """
import json, sys, torch
from resnetlab.data import load_dataset
from resnetlab.train import load_checkpoint
model = load_checkpoint(sys.argv[1])
_, test = load_dataset("fashion-mnist")
with torch.no_grad():
    p = model(test.images[:64].float() / 255).softmax(1)
print(json.dumps(p.tolist()))
"""


def test_a_checkpoint_gives_the_same_probabilities_with_every_cpu_class_of_kernels(run) -> None:
    """Native kernels and AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2) agree within 1e-5, whatever the run trained in."""
    _, result, _ = run
    probabilities = []
    for isa in (None, "AVX2"):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        proc = subprocess.run(
            [sys.executable, "-c", PROBABILITIES, str(result.run_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        probabilities.append(torch.tensor(json.loads(proc.stdout)))
    assert (probabilities[0] - probabilities[1]).abs().max().item() <= 1e-5


def test_export_matches_the_checkpoint_and_predict_agrees(
    run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from PIL import Image

    from resnetlab.data import load_dataset
    from resnetlab.onnx_runtime import OnnxClassifier

    _, result, _ = run
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(result.run_dir), "--out", str(onnx_file)]) == 0
    capsys.readouterr()
    _, test = load_dataset("fashion-mnist")
    x = test.images[:32].float() / 255
    with torch.no_grad():
        torch_logits = load_checkpoint(result.run_dir)(x).numpy()
    onnx_logits = OnnxClassifier(onnx_file).logits(x.numpy())
    assert np.abs(torch_logits - onnx_logits).max() <= 1e-4
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(test.images[i, 0].numpy()).save(files[-1])
    assert main(["predict", str(result.run_dir), *files, "--json", "--topk", "3"]) == 0
    by_torch = json.loads(capsys.readouterr().out)
    assert main(["predict", "--onnx", str(onnx_file), *files, "--json", "--topk", "3"]) == 0
    by_onnx = json.loads(capsys.readouterr().out)
    for t, o in zip(by_torch, by_onnx):
        assert [x["class"] for x in t["top"]] == [x["class"] for x in o["top"]]
        assert np.allclose(
            [x["probability"] for x in t["top"]], [x["probability"] for x in o["top"]], atol=1e-5, rtol=0
        )


# ----------------------------------------------------------------------------------------------
# bf16 inference is opt-in, and said to be slow where it is emulated


@pytest.mark.parametrize("native", [True, False])
def test_bf16_inference_is_opt_in_and_warned_where_emulated(
    native: bool, run, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, result, _ = run
    monkeypatch.setattr(device_mod, "cpu_class", lambda: "AMX" if native else "AVX2")
    assert main(["eval", str(result.run_dir), "--precision", "bf16", "--json"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "no native bf16" in line]
    assert len(warned) == (0 if native else 1)
    if not native:
        assert warned[0] == (
            "resnetlab: warning: this CPU (AVX2) has no native bf16; it is emulated here, several times "
            "slower than fp32 (--precision fp32 is the fast one)"
        )
    assert main(["eval", str(result.run_dir), "--json"]) == 0
    assert "no native bf16" not in capsys.readouterr().err  # fp32, the default, says nothing
