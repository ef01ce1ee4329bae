"""CUDA: what changes when training runs on a GPU (issue 5, target 4).

Skipped where no CUDA device is present, as in CI; ``scripts/gpu.sh`` runs them on a lent GPU
machine together with the GPU benchmarks. They check the promises the CPU tests cannot: the
random transforms and the batch order do not depend on the device, every precision trains on
the GPU, and a run trained there evaluates and resumes on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resnetlab.cli import main
from resnetlab.data import BatchLoader, load_dataset, random_crop, random_erasing, random_flip
from resnetlab.train import train
from resnetlab.train.setup import seeded_subset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu.sh on one)")

SMALL = dict(model="resnet10", width=8, subset=2048, batch_size=64, epochs=3, progress=False)


@pytest.mark.parametrize("name", ["crop", "flip", "erase"])
def test_random_transforms_are_the_same_on_cuda_and_cpu(name: str) -> None:
    transform = {"crop": lambda x, g: random_crop(x, 3, g), "flip": random_flip, "erase": random_erasing}[name]
    x = torch.rand(32, 3, 20, 20)
    on_cpu = transform(x, torch.Generator().manual_seed(7))
    on_gpu = transform(x.cuda(), torch.Generator().manual_seed(7))
    assert on_gpu.is_cuda and torch.equal(on_cpu, on_gpu.cpu())
    assert not torch.equal(on_cpu, x)


def test_batch_loader_on_cuda_keeps_the_cpu_order() -> None:
    train_split, _ = load_dataset("fashion-mnist")
    split = seeded_subset(train_split, 1000, 0)
    on_cpu = BatchLoader(split, 128, shuffle=True, seed=1)
    on_gpu = BatchLoader(split, 128, shuffle=True, seed=1, device="cuda")
    for (xa, ya), (xb, yb) in zip(on_cpu.batches(2), on_gpu.batches(2), strict=True):
        assert xb.is_cuda and xb.dtype == torch.uint8
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_on_cuda(precision: str, tmp_path: Path) -> None:
    result = train("fast", out=tmp_path / "run", device="cuda", precision=precision, **SMALL)
    assert result.device.startswith("cuda")
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0] and result.test_acc > 0.5  # chance is 0.1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision"] == precision and config["device"].startswith("cuda")


def test_auto_precision_is_bf16_on_a_bf16_gpu(tmp_path: Path) -> None:
    result = train("fast", out=tmp_path / "run", device="cuda", **{**SMALL, "epochs": 1})
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_a_gpu_run_evaluates_and_resumes_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    gpu = train("fast", out=run, device="cuda", precision="fp32", **SMALL)
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same weights on another device: cuDNN and the CPU kernels round differently, so a few
    # borderline test images may flip, no more
    assert abs(evaluated["accuracy"] - gpu.test_acc) <= 0.005
    resumed = train(resume=run, device="cpu")  # a finished run: nothing left to train, evaluated again
    assert resumed.device == "cpu" and len(resumed.history) == SMALL["epochs"] and resumed.confusion is not None
    assert abs(resumed.confusion.diag().sum().item() / 10_000 - gpu.test_acc) <= 0.005


def _synchronizations(**run: object) -> int:
    """How many times a training run makes the host wait for the GPU (CUDA's sync debug mode)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train("fast", device="cuda", **run)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_training_steps_do_not_wait_for_the_gpu(tmp_path: Path) -> None:
    # The same run with 80 more steps: waits added by the steps themselves are the loss check every
    # 20 steps (4), not one or more per step (step timing, mask copies, ...).
    common = dict(model="resnet10", width=8, batch_size=64, epochs=1, progress=False, augment="flip,crop,erase")
    train("fast", out=tmp_path / "warm", device="cuda", subset=640, **common)  # type: ignore[arg-type]
    short = _synchronizations(out=tmp_path / "short", subset=64 * 20, **common)
    long = _synchronizations(out=tmp_path / "long", subset=64 * 100, **common)
    assert long - short <= 80 // 20 + 2, (short, long)
