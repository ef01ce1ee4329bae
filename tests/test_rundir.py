"""The run directory (train/rundir.py): its files and their mode, --force and .previous-run, refusals, names.

RunLock has its own tests in test_run_lock.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import TINY, TINY_FLAGS, _copy_run
from resnetlab.cli import main
from resnetlab.train import NonFiniteLoss, train
from resnetlab.train import loop as loop_module


def test_run_directory_contents(tiny_run) -> None:
    d = tiny_run.run_dir
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "last.safetensors"):
        assert (d / name).stat().st_size > 0, name
    config = json.loads((d / "config.json").read_text())
    assert config["recipe"]["model"] == "resnet10" and config["seed"] == 0
    assert {"torch", "python", "device", "git_commit", "resnetlab"} <= set(config)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["epoch"]) for r in rows] == [
        (kind, e) for e in (1, 2, 3) for kind in ["step"] * 11 + ["epoch"]
    ]
    epoch_row = rows[11]  # 32 steps per epoch: a row after steps 3, 6, ..., 30 and 32
    assert {"step", "epoch_fraction", "train_loss", "train_acc", "test_acc", "images_per_s", "seconds"} <= set(
        epoch_row
    )
    assert (epoch_row["step"], epoch_row["epoch_fraction"]) == (32, 1.0)
    csv_lines = (d / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,train_acc,test_acc") and len(csv_lines) == 4
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("code, fix", [(28, "free some disk space"), (13, "check the permissions")])  # ENOSPC, EACCES
def test_a_full_disk_or_a_forbidden_path_is_one_line(
    code: int, fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr("resnetlab.train.rundir.atomic_write_bytes", fail)  # config.json, the first file a run writes
    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"resnetlab: error: {os.strerror(code)} ({tmp_path / 'r' / 'config.json'}); {fix}")
        and err.count("\n") == 1
    )


def test_run_files_get_the_umask_mode_not_mkstemps_0600(tiny_run) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "last.safetensors"):
        assert (tiny_run.run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_existing_run_directory_is_not_overwritten(tiny_run, capsys: pytest.CaptureFixture[str]) -> None:
    before = tiny_run.checkpoint.read_bytes()
    assert main(["train", "--out", str(tiny_run.run_dir), "--subset", "64", "--epochs", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert tiny_run.checkpoint.read_bytes() == before


@pytest.mark.parametrize("under", ["a-file", "a-long-name"])
def test_run_directory_that_cannot_be_created_is_one_line(
    under: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if under == "a-file":
        (tmp_path / "g.png").write_bytes(b"png")
        out = tmp_path / "g.png" / "run"  # NotADirectoryError
    else:
        out = tmp_path / ("r" * 300) / "run"  # a name longer than any file system allows (255): even root fails
    assert main(["train", "--subset", "64", "--epochs", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and f"cannot create run directory {out}: " in err and "another --out" in err
    assert captured.out == ""  # before any training


@pytest.mark.parametrize(
    "flags", [["--subset", "100000000"], ["--resize", "8", "--model", "resnet18", "--stem", "imagenet"]]
)
def test_force_keeps_the_old_run_until_the_new_one_passes_its_checks(
    flags: list[str], tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runF"
    before = _copy_run(tiny_run.run_dir, out)
    assert main(["train", "--out", str(out), "--force", "--epochs", "1", *flags]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # once deleted at the start, before the checks


def test_an_out_through_a_missing_folder_and_dotdot_is_the_run_it_names(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # missing/../run is run: it exists, so without --force it is refused and kept (it was deleted)
    before = _copy_run(tiny_run.run_dir, tmp_path / "run")
    out = tmp_path / "missing" / ".." / "run"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert not (tmp_path / "missing").exists()


def test_a_run_directory_without_a_checkpoint_is_not_offered_for_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # what a run killed before its first checkpoint leaves (SIGKILL cannot be caught to clean up)
    out = tmp_path / "killed"
    out.mkdir()
    (out / "config.json").write_text('{"recipe": {"name": "fast"}, "resnetlab": "0.1.0"}')  # as a run writes it first
    assert main(["train", *TINY_FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no checkpoint to resume; use --force" in err and "--resume" not in err
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_force_replaces_the_old_run(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "runF"
    before = _copy_run(tiny_run.run_dir, out)
    (out / "model.onnx").write_bytes(b"the old run's export")  # was left, as if exported from the new run
    train("fast", out=out, force=True, **{**TINY, "subset": 64, "epochs": 1})
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()] == ["step"] + [
        "epoch"
    ]
    assert (out / "last.safetensors").read_bytes() != before["last.safetensors"]


@pytest.mark.parametrize("stale_aside", [False, True])
def test_force_keeps_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(
    stale_aside: bool, tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --force deleted the old run as the new one started: a new run that then failed left neither.
    out = tmp_path / "runF"
    (out / "model.onnx").parent.mkdir()
    (out / "model.onnx").write_bytes(b"onnx")  # the old run's export goes and comes back with it
    before = _copy_run(tiny_run.run_dir, out / "copy")
    for name in before:
        (out / "copy" / name).rename(out / name)
    (out / "copy").rmdir()
    before["model.onnx"] = b"onnx"
    if stale_aside:  # left beside a finished run (a kill after a checkpoint, or emptied by hand): not "the old run"
        (out / ".previous-run").mkdir()
    real = loop_module.train_inputs
    monkeypatch.setattr(loop_module, "train_inputs", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLoss):
        train("fast", out=out, force=True, **{**TINY, "epochs": 1})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no .previous-run left


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize(
    "config, says",
    [
        (None, "holds files but no resnetlab run; a run needs a new or empty folder"),
        ('{"mine": 1}', "holds config.json but no resnetlab run"),
    ],
)
def test_a_folder_that_holds_no_run_is_refused_even_with_force(
    force: list[str], config: str | None, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --force wrote a run's files into any folder without a config.json (as root, even /), and removed a
    # config.json or metrics.csv it had not written; without --force the error offered --force
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    if config is not None:
        (out / "config.json").write_text(config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", *TINY_FLAGS, "--out", str(out), *force]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--out {out} {says}" in err and "--force" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_force_run_killed_before_its_first_checkpoint_names_the_run_it_set_aside(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runK"
    before = _copy_run(
        tiny_run.run_dir, out / ".previous-run"
    )  # what a SIGKILL between set-aside and checkpoint leaves
    (out / "config.json").write_bytes(before["config.json"])
    assert main(["train", *TINY_FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err
        and f"holds no checkpoint to resume (the run it was replacing is in {out / '.previous-run'})" in err
    )
    train("fast", out=out, force=True, **{**TINY, "subset": 64, "epochs": 1})  # --force replaces that old run too
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_two_runs_started_in_the_same_second_get_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default name has 1-second resolution, and both runs wrote into the one directory.
    from datetime import datetime

    from resnetlab.train import rundir

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return cls(2026, 12, 1, 6, 30, 0)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = train("fast", **{**TINY, "subset": 64, "epochs": 1}).run_dir
    second = train("fast", **{**TINY, "subset": 64, "epochs": 1}).run_dir
    assert (first, second) == (Path("runs/fast-20261201-063000"), Path("runs/fast-20261201-063000-2"))
    assert (first / "last.safetensors").is_file() and (second / "last.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(
    existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop_module.train_inputs
    monkeypatch.setattr(loop_module, "train_inputs", lambda *a: real(*a) * float("nan"))
    out = tmp_path / "runs" / "nan"  # both directories made by the run, or out made by the user
    if existing:
        out.mkdir(parents=True)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 0 \(lr .*; no checkpoint was written yet") as info:
        train("fast", out=out, **{**TINY, "epochs": 1})
    assert "--precision fp32" not in str(info.value)  # it is fp32 on this CPU already: that hint was wrong
    # A config.json alone could be neither resumed (no checkpoint) nor reused (already exists).
    assert (out.is_dir() and not any(out.iterdir())) if existing else not (tmp_path / "runs").exists()
