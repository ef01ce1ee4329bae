"""A run directory belongs to one live run: the flock on RUN/.lock (train/rundir.py, RunLock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.errors import UsageError
from resnetlab.train import NonFiniteLoss, train
from resnetlab.train import commands as commands_module
from resnetlab.train import loop as loop_module
from resnetlab.train.rundir import LOCK_NAME, RUN_FILES, check_not_in_use

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny folder dataset: 2 classes of 16 grey 8x8 PNGs, 24 to train (6 steps of 4) and 8 to test."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    return f"folder:{root}?holdout=0.25"


def _tiny(dataset: str) -> dict:
    return dict(
        dataset=dataset, model="resnet10", width=8, resize=16, batch_size=4, epochs=1, precision="fp32", progress=False
    )


def _flags(dataset: str) -> list[str]:
    return [
        "--recipe",
        "fast",
        "--dataset",
        dataset,
        "--model",
        "resnet10",
        "--width",
        "8",
        "--resize",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--precision",
        "fp32",
    ]


# A real `resnetlab train` in its own process, which stops at a known point (stdin says when to go on;
# its end, EOF, lets it run to the end): "start" before it starts, "config" once it has locked its
# directory and written config.json, "checkpoint" after each checkpoint.
LIVE_RUN = r"""
import sys
from resnetlab.cli import main
from resnetlab.train import loop, rundir

def paused(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        print("PAUSED", flush=True)
        sys.stdin.readline()
        return result
    return wrapper

stops = sys.argv[1].split(",")
if "config" in stops:
    loop.write_json = paused(loop.write_json)  # train() writes config.json with it, and nothing else
if "checkpoint" in stops:
    rundir.RunFiles.mark_checkpointed = paused(rundir.RunFiles.mark_checkpointed)
if "start" in stops:
    print("READY", flush=True)
    sys.stdin.readline()
sys.exit(main(["train", *sys.argv[2:]]))
"""


class LiveRun:
    """A `train` process started with LIVE_RUN; its stdout lines are collected by a thread."""

    def __init__(self, stops: str, dataset: str, out: Path, *flags: str, cwd: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LIVE_RUN, stops, *_flags(dataset), "--out", str(out), *flags],
            env=ENV,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def says(self, word: str) -> bool:
        return any(line.strip() == word for line in list(self.lines))

    def wait_for(self, word: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.says(word):
            assert self.proc.poll() is None, f"the run ended ({self.proc.returncode}): {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"the run never said {word}"
            time.sleep(0.01)

    def go(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Let it run to its end (no more stops); its exit status and stderr."""
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} | {
        p.name + "/": b"" for p in run_dir.iterdir() if p.is_dir()
    }


@pytest.fixture(scope="module")
def live_run(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """A run stopped after its first checkpoint, holding its directory."""
    root = tmp_path_factory.mktemp("live")
    run = LiveRun("checkpoint", dataset, root / "run", "--checkpoint-every", "1", cwd=root)
    try:
        run.wait_for("PAUSED")
        yield run
    finally:
        run.kill()


@pytest.mark.parametrize(
    "flags",
    [["--out"], ["--force", "--out"], ["--resume"], ["--nproc", "2", "--force", "--out"]],
    ids=["out", "force", "resume", "nproc-launcher"],
)
def test_a_second_train_on_a_live_runs_directory_is_refused_naming_its_pid(
    flags: list[str],
    live_run: LiveRun,
    dataset: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = live_run.out
    before = _files(out)
    monkeypatch.setattr(commands_module, "_launch_torchrun", lambda nproc: pytest.fail("the launcher started workers"))
    argv = ["--resume", str(out)] if flags == ["--resume"] else [*_flags(dataset), "--seed", "7", *flags, str(out)]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"run directory {out} is in use by a live run (PID {live_run.pid}); wait for it to finish or stop it" in err
    assert _files(out) == before  # nothing set aside (--force), rewritten or removed
    assert (out / LOCK_NAME).read_text() == f"{live_run.pid}\n"
    assert live_run.proc.poll() is None


def test_eval_predict_and_export_run_beside_a_live_run(
    live_run: LiveRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    out = live_run.out
    with pytest.raises(UsageError, match=f"in use by a live run \\(PID {live_run.pid}\\)"):
        check_not_in_use(out)  # the directory is held
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    png = tmp_path / "a.png"
    Image.new("L", (8, 8), 128).save(png)
    assert main(["predict", str(out), str(png), "--json"]) == 0
    assert main(["export", str(out)]) == 0  # model.onnx beside the live run's files
    assert (out / "model.onnx").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(UsageError, match=f"PID {live_run.pid}"):
        check_not_in_use(out)  # still held: the readers neither took the lock nor removed its file
    assert live_run.proc.poll() is None


@pytest.mark.parametrize("stop", ["config", "checkpoint"])
def test_a_run_killed_by_sigkill_leaves_no_lock(
    stop: str, dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    run = LiveRun(stop, dataset, out, "--checkpoint-every", "1", cwd=tmp_path)
    try:
        run.wait_for("PAUSED")
        assert main(["train", *_flags(dataset), "--seed", "7", "--out", str(out), "--force"]) == 2
        assert f"in use by a live run (PID {run.pid})" in capsys.readouterr().err
    finally:
        run.kill()  # SIGKILL: nothing of it runs again, it cannot release anything itself
    assert (out / LOCK_NAME).is_file()  # left behind, but the OS released its flock
    check_not_in_use(out)
    if stop == "config":  # killed before its first checkpoint: as before, --force, not --resume
        assert main(["train", *_flags(dataset), "--seed", "7", "--out", str(out)]) == 2
        assert "holds no checkpoint to resume; use --force" in capsys.readouterr().err
        assert main(["train", *_flags(dataset), "--seed", "7", "--out", str(out), "--force"]) == 0
        assert json.loads((out / "config.json").read_text())["seed"] == 7
    else:
        assert main(["train", "--resume", str(out)]) == 0
        assert "resuming" in capsys.readouterr().out
        assert read_checkpoint(out)[1]["position"] == {"epoch": 1, "step": 0}
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # an orderly end removes the lock file


def test_two_runs_started_in_the_same_instant_on_one_new_out(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runs = {seed: LiveRun("start,config", dataset, out, "--seed", str(seed), cwd=tmp_path) for seed in (1, 2)}
    try:
        for run in runs.values():
            run.wait_for("READY")  # imported, each waiting for the same go
        for run in runs.values():
            run.go()
        deadline = time.monotonic() + 180
        while not (
            any(r.proc.poll() is not None for r in runs.values()) and any(r.says("PAUSED") for r in runs.values())
        ):
            assert not all(r.says("PAUSED") for r in runs.values()), "both runs passed the lock and wrote config.json"
            assert time.monotonic() < deadline, "neither run was refused"
            time.sleep(0.01)
        (seed, winner), (_, loser) = sorted(runs.items(), key=lambda item: not item[1].says("PAUSED"))
        code, err = loser.proc.returncode, loser.proc.stderr.read()
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and f"run directory {out} is in use by a live run (PID {winner.pid})" in lines[0]
        code, err = winner.finish()
        assert code == 0, err
    finally:
        for run in runs.values():
            run.kill()
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # the winner's run alone
    assert json.loads((out / "config.json").read_text())["seed"] == seed
    assert read_checkpoint(out)[1]["recipe"]["seed"] == seed


def test_a_folder_holding_only_a_stale_lock_is_a_new_run_directory(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")  # a run killed before it wrote anything; no process holds the flock
    train("fast", out=out, **_tiny(dataset))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


@pytest.mark.parametrize("named", [True, False], ids=["out-under-a-missing-folder", "default-name"])
def test_a_run_holds_its_directory_and_a_failure_before_its_first_checkpoint_removes_the_lock_too(
    named: bool, dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    made = tmp_path / ("missing" if named else "runs")
    out = made / "run" if named else None
    real = loop_module.train_inputs
    held: list[str] = []

    def nan_inputs(*args):  # type: ignore[no-untyped-def]
        run_dir = out or next(made.iterdir())  # runs/fast-DATE-TIME, claimed by mkdir
        try:
            check_not_in_use(run_dir)
        except UsageError as err:
            held.append(str(err))
        return real(*args) * float("nan")

    monkeypatch.setattr(loop_module, "train_inputs", nan_inputs)
    with pytest.raises(NonFiniteLoss):
        train("fast", out=out, **_tiny(dataset))
    assert held and f"(PID {os.getpid()})" in held[0]  # the run held its directory
    assert not made.exists()  # the lock file went with the run's files and the directories it made
