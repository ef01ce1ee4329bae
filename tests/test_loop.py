"""The training loop (train/loop.py): end-to-end runs, --eval-every, progressive sizes, the chapter's d2l lines,
signals and SIGKILL-resume, a NaN loss, resuming a finished run.

The shared ``tiny_run`` fixture is in conftest.py; TINY, TINY_FLAGS, ENV and ``_copy_run`` in helpers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ENV, TINY, TINY_FLAGS, _copy_run
from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.train import RECIPES, NonFiniteLoss, train
from resnetlab.train import loop as loop_module


def test_tiny_model_learns(tiny_run) -> None:
    losses = [row["train_loss"] for row in tiny_run.history]
    assert losses[-1] < losses[0] * 0.8
    assert tiny_run.test_acc > 0.5  # chance is 0.1


def test_eval_every_tests_only_the_chosen_epochs_and_trains_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every = train("fast", out=tmp_path / "every", **{**TINY, "epochs": 3, "eval_every": 1})
    capsys.readouterr()
    second = train("fast", out=tmp_path / "second", **{**TINY, "epochs": 3, "eval_every": 2})
    printed = capsys.readouterr().out
    assert [r["test_acc"] is not None for r in second.history] == [False, True, True]  # the 2nd, and the last always
    assert "epoch 1/3: " in printed and "test acc not measured (--eval-every)" in printed
    # the test passes change nothing in training: the same losses and final accuracy as testing every epoch
    assert [r["train_loss"] for r in second.history] == [r["train_loss"] for r in every.history]
    assert second.test_acc == every.test_acc and second.history[1]["test_acc"] == every.history[1]["test_acc"]
    assert (tmp_path / "second" / "metrics.csv").read_text().splitlines()[1].split(",")[
        3
    ] == ""  # no test acc for epoch 1
    assert (tmp_path / "second" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("epochs", "sizes", "expected"), [(3, "16,20", [16, 20, 24]), (3, "12", [12, 24, 24]), (2, "none", [24, 24])]
)
def test_progressive_sizes_train_the_early_epochs_smaller_and_the_last_at_the_test_size(
    epochs: int, sizes: str, expected: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = loop_module.train_inputs

    def recording(*args):  # type: ignore[no-untyped-def]
        x = real(*args)
        seen.append(x.shape[-1])
        return x

    monkeypatch.setattr(loop_module, "train_inputs", recording)
    result = train(
        "fast", out=tmp_path / "run", **{**TINY, "subset": 128, "epochs": epochs, "progressive_sizes": sizes}
    )
    assert seen == [size for size in expected for _ in range(2)]  # 2 steps of 64 per epoch
    assert len(result.history) == epochs and result.test_acc is not None  # tested at 24 px


def test_d2l_output_has_the_chapters_two_lines(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnetlab",
            "train",
            "--recipe",
            "d2l",
            "--subset",
            "256",
            "--epochs",
            "1",
            "--resize",
            "32",
            "--width",
            "8",
            "--out",
            str(tmp_path / "d2l"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"training on cpu \([\w -]+, \d+ threads\): fp32", lines[0])  # the chapter's recipe: fp32, NCHW
    i = next(i for i, line in enumerate(lines) if line.startswith("loss "))
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}", lines[i])
    assert re.fullmatch(r"\d+\.\d examples/sec on cpu", lines[i + 1])
    config = json.loads((tmp_path / "d2l" / "config.json").read_text())
    assert config["precision"] == "fp32" and config["recipe"]["init"] == "xavier"


def _model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "resnetlab", "train", "--recipe", "fast", *TINY_FLAGS, "--out", str(out), *extra]


def _wait_for_checkpoints(proc: subprocess.Popen, path: Path, count: int, timeout: float = 120) -> None:
    """Wait until ``path`` has been (re)written ``count`` times."""
    seen, last = 0, None
    deadline = time.monotonic() + timeout
    while seen < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.01)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_and_resume_is_bit_identical(precision: str, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        _train_cmd(reference, "--precision", precision), check=True, env=ENV, capture_output=True, timeout=300
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(killed, "--checkpoint-every", "1", "--precision", precision),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_checkpoints(proc, killed / "last.safetensors", 5)  # mid-epoch 1, between two rows of the curve
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, meta = read_checkpoint(killed)
    assert meta["position"]["epoch"] in (0, 1) and len(meta["history"]) == meta["position"]["epoch"]
    resumed = subprocess.run(
        [sys.executable, "-m", "resnetlab", "train", "--resume", str(killed)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = _model_tensors(reference), _model_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    timing = {"images_per_s", "compute_images_per_s", "seconds"}  # all else is exact: the curve's rows too
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == [
        {k: v for k, v in r.items() if k not in timing} for r in ref_rows
    ]


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without their timings (which differ from run to run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "compute_images_per_s", "seconds")} for r in rows]


def test_the_curve_has_ten_rows_per_epoch_and_a_resume_between_two_rows_keeps_them_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**TINY, "subset": 320, "batch_size": 16}  # 20 steps per epoch: a row after every 2nd
    reference = train("fast", out=tmp_path / "reference", **settings).run_dir
    rows = _rows(reference)
    assert [r["kind"] for r in rows] == (["step"] * 10 + ["epoch"]) * 2
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(2, 41, 2))  # global steps
    assert [r["epoch_fraction"] for r in steps[:10]] == [k / 10 for k in range(1, 11)]
    assert all(0 <= r["train_acc"] <= 1 and r["train_loss"] > 0 and "test_acc" not in r for r in steps)
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch_fraction"] for r in epoch_rows] == [1.0, 1.0] and epoch_rows[-1]["test_acc"] is not None
    # the epoch's training figures are those of its rows, pooled
    assert epoch_rows[0]["train_acc"] == pytest.approx(sum(r["train_acc"] for r in steps[:10]) / 10)

    real, calls = loop_module.train_inputs, {"n": 0}

    def interrupted_at_step_25(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 25:  # epoch 2, step 5: one step after its 2nd row
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag; the step completes
        return real(*args)

    monkeypatch.setattr(loop_module, "train_inputs", interrupted_at_step_25)
    out = tmp_path / "interrupted"
    with pytest.raises(loop_module.TrainingInterrupted):
        train("fast", out=out, **settings)
    _, meta = read_checkpoint(out)
    assert meta["position"] == {"epoch": 1, "step": 5} and meta["interval"]["count"] == 16  # step 5, not in a row
    assert len(meta["curve"]) == 12
    monkeypatch.setattr(loop_module, "train_inputs", real)
    train(resume=out, progress=False)
    assert _rows(out) == rows
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "signum, says", [(signal.SIGINT, "interrupted at epoch"), (signal.SIGTERM, "terminated (SIGTERM) at epoch")]
)
def test_ctrl_c_and_sigterm_save_and_exit_128_plus_the_signal(signum: int, says: str, tmp_path: Path) -> None:
    # SIGTERM (timeout, kill, Slurm and Kubernetes before they kill) ended the run without a checkpoint
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(out, "--checkpoint-every", "1000", "--subset", "2048"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while "epoch 1/" not in (line := proc.stdout.readline()):  # the first epoch checkpoints; then signal mid-epoch 2
        assert line, proc.stderr.read()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "--resume" in lines[0]
    _, meta = read_checkpoint(out)
    assert (
        meta["position"]["epoch"] == 1 and meta["position"]["step"] > 0
    )  # saved at the signal, not at the epoch's end


def test_ctrl_c_before_a_force_runs_first_checkpoint_puts_the_old_run_back(tiny_run, tmp_path: Path) -> None:
    # the interrupt's checkpoint counted as the first one, and a mistaken --force stopped at once lost the old run
    out = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, out)
    proc = subprocess.Popen(
        _train_cmd(out, "--force", "--subset", "2048"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while "training on" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert (
        len(lines) == 1
        and f"before this run's first checkpoint; {out} holds the run it was replacing again" in lines[0]
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_signal_during_the_first_test_pass_of_a_force_run_puts_the_old_run_back(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only steps checked the flag: epoch 1's test pass went on to checkpoint, which deleted the old run
    out = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, out)
    real = loop_module.evaluate

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "evaluate", interrupted)
    with pytest.raises(
        loop_module.TrainingInterrupted, match="before this run's first checkpoint; .* holds the run it was replacing"
    ):
        train("fast", out=out, force=True, **{**TINY, "subset": 128})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_module.train_inputs
    calls = {"n": 0}

    def poisoned(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        x = real(*args)
        return x * float("nan") if calls["n"] > 8 else x  # epoch 2, first step

    monkeypatch.setattr(loop_module, "train_inputs", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 0 \(lr .*; the last good checkpoint in .* is kept"):
        train("fast", out=out, **TINY)
    _, meta = read_checkpoint(out)
    assert meta["position"] == {"epoch": 1, "step": 0}
    assert all(torch.isfinite(v).all() for k, v in _model_tensors(out).items() if v.is_floating_point())


def test_resume_repairs_metrics_and_curves_and_keeps_the_config(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    config = (run / "config.json").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(
        "".join(metrics.splitlines(keepends=True)[:-1])
    )  # killed before the last row landed
    (run / "curves.png").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"{run} finished its 3 epochs; evaluating it again" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "curves.png").exists()
    assert (run / "config.json").read_bytes() == config  # the command and commit that started it


def test_resume_of_a_finished_run_evaluates_it_again(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it said "evaluating it again" and reported the accuracy stored in its history
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    zeroed = {k: torch.zeros_like(v) if k.startswith("model.fc.") else v for k, v in tensors.items()}
    run = tmp_path / "run"
    _copy_run(tiny_run.run_dir, run)
    save_checkpoint(run / "last.safetensors", zeroed, meta)
    result = train(resume=run)
    assert result.test_acc == 0.1 != meta["history"][-1]["test_acc"]  # all logits equal: class 0 everywhere


def test_python_api_accepts_a_recipe_object(tmp_path: Path) -> None:
    recipe = dataclasses.replace(RECIPES["fast"], model="resnet10", width=8, subset=128, epochs=1, batch_size=64)
    result = train(recipe, out=tmp_path / "r", progress=False)
    assert result.checkpoint.exists() and 0 <= result.test_acc <= 1 and np.isfinite(result.train_loss)
