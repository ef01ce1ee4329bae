"""Resolving a training request (train/request.py): flag checks, --resume refusals, damaged resume metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import _copy_run, _train_refused
from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.errors import UsageError
from resnetlab.train import train


def test_resume_names_an_unknown_field_from_the_python_api(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="drop --bogus"):  # an AttributeError for a moment
        train(resume=tiny_run.run_dir, bogus=1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0"], "lr must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--batch-size", "0"], "batch size must be >= 1"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--recipe", "fastest"], "unknown recipe 'fastest'"),
        (["--model", "resnet19"], "did you mean"),
        (["--dataset", "imagenet"], "imagenet"),
        (
            ["--resize", "8", "--model", "resnet18", "--stem", "imagenet"],
            "a downsampling layer would see a 1x1 map; use --resize 17 or more, or --stem small",
        ),
        (["--augment", "rotate"], "unknown augmentation"),
        (["--eval-every", "-1"], "eval every must be >= 0"),
        (["--progressive-sizes", "16,x"], "progressive sizes must be none or a comma list"),
        (
            ["--progressive-sizes", "20,2", "--model", "resnet18", "--stem", "imagenet"],
            "use --progressive-sizes sizes of 17 or more",
        ),
        (
            ["--progressive-sizes", str(2**31)],
            "progressive sizes must be none or a comma list of sizes in [1, 2**31 - 1]",
        ),
        (
            ["--epochs", "2", "--progressive-sizes", "16,20"],  # 20 was dropped silently
            "progressive sizes 16,20 name 2 early epoch(s), but with 2 epoch(s) only 1 train before the last "
            "(which trains at --resize)",
        ),
        (["--resize", str(10**20)], "resize must be in [0, 2**31 - 1]"),
        (["--momentum", "0"], "Nesterov momentum needs momentum; set --momentum (e.g. 0.9) or add --no-nesterov"),
        (
            ["--width", "4"],
            "width 4 with channels_last crashes PyTorch's CPU kernels (fewer than 8 channels); use --width 8",
        ),
        (["--lr", "1e39"], "lr must be at most 3.4e+38 (float32)"),
        (["--weight-decay", "1e308"], "weight decay must be at most 3.4e+38"),
        (["--width", str(10**20)], "width must be in [1, 2**31 - 1]"),
        (["--max-width", "8"], "max width must be in [16, 2**31 - 1] (at least the width), not 8"),  # fast: width 16
        (["--model", "resnet18", "--width", "32", "--max-width", "16"], "max width must be in [32, 2**31 - 1]"),
        (["--max-width", str(10**20)], "max width must be in [16, 2**31 - 1]"),
        (["--crop-padding", str(10**20), "--augment", "crop"], "crop padding must be in [0, 2**31 - 1]"),
        (["--tta-translate", "9"], "tta translate must be in [0, 8] pixels, not 9"),
        (["--dataset", "folder:/nonexistent?seed=99999999999999999999999"], "folder seed must be in torch's range"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["train", "--subset", "64", "--out", str(out), *flags])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and "\n" not in err and message in err
    assert not out.exists() and captured.out == ""  # no empty run directory, no "training on cpu" before the error


@pytest.mark.parametrize(
    "edit, what",
    [
        ({"position": {"epoch": "x", "step": 0}}, "position.epoch is 'x', not an integer >= 0"),
        ({"position": {"epoch": -5, "step": 0}}, "position.epoch is -5, not an integer >= 0"),
        ({"optimizer": "garbage"}, "optimizer is 'garbage', not a list of 2 param groups"),
        ({"recipe": {}}, "recipe"),
        ({"recipe": {"bogus": 1}}, "recipe"),
        ({"history": "zz"}, "history is not a list of the 3 finished epochs"),
        ({"sums": None}, "sums is None, not an object"),
    ],
)
def test_resume_of_a_checkpoint_with_damaged_resume_metadata_is_one_line(
    edit: dict, what: str, tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # eval, predict and export check the metadata they read; --resume read the rest unchecked: TypeError,
    # IndexError, KeyError, AttributeError tracebacks
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    save_checkpoint(tmp_path / "last.safetensors", tensors, {**meta, **edit})
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has corrupt resume metadata ({what}); it cannot be resumed" in err


def test_resume_accepts_a_flag_given_with_the_runs_own_value(tiny_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _copy_run(tiny_run.run_dir, run)
    train(
        resume=run, width=8, epochs=read_checkpoint(run)[1]["recipe"]["epochs"]
    )  # refused before, with "drop --width"
    with pytest.raises(UsageError, match="drop --width"):
        train(resume=run, width=16)


def test_resume_refuses_overrides(tiny_run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tiny_run.run_dir), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--momentum", "--label-smoothing", "--warmup"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_float_flags_are_refused(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --lr inf and --weight-decay inf passed the range checks and training died at step 1
    err = _train_refused(tmp_path, capsys, f"{flag}={value}", "--subset", "64")
    assert f"{flag[2:].replace('-', ' ')} must be a finite number, not {float(value)}" in err


@pytest.mark.parametrize("seed", [str(-(2**63) - 1), str(2**64), "99999999999999999999999"])
def test_seed_out_of_range_is_refused(seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_refused(tmp_path, capsys, "--seed", seed, "--subset", "64")
    assert f"seed must be in torch's range [-2**63, 2**64 - 1], not {seed}" in err


def test_resume_of_a_force_run_stopped_before_its_first_checkpoint_names_the_old_run(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runK"
    before = _copy_run(tiny_run.run_dir, out / ".previous-run")
    (out / "config.json").write_bytes(before["config.json"])
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the run it was replacing is in {out / '.previous-run'}" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--out", "OTHER"],
        ["--force"],
        ["--out", "OTHER", "--force"],
        ["--init-from", "OTHER"],
        ["--recipe", "d2l"],
        ["--recipe", "fast"],
    ],
)  # --recipe was ignored silently
def test_resume_refuses_out_and_force(
    flags: list[str], tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, run)
    other = tmp_path / "other"
    flags = [str(other) if f == "OTHER" else f for f in flags]
    assert main(["train", "--resume", str(run), *flags]) == 2  # both were silently ignored, and config.json rewritten
    err = capsys.readouterr().err.strip()
    dropped = " and ".join(f for f in flags if f.startswith("--"))
    assert "\n" not in err and f"--resume continues the run in {run}; drop {dropped}" in err
    assert not other.exists() and {p.name: p.read_bytes() for p in run.iterdir()} == before
