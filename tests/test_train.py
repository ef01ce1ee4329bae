"""Training (issue 4): recipes, the loop, the run directory, resume, faults, bad input, using the model."""

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
from PIL import Image

from resnetlab.cli import main
from resnetlab.errors import UsageError
from resnetlab.train import RECIPES, NonFiniteLoss, load_checkpoint, train
from resnetlab.train import loop as loop_module
from resnetlab.checkpoint import read_checkpoint

# eval_every=1: fast tests after its last epoch only, and these tests compare every epoch's test accuracy.
# fp32 forced: no test assumes what `auto` picks here; tests/test_precision.py covers bf16 too.
TINY = dict(model="resnet10", width=8, subset=512, batch_size=64, epochs=2, eval_every=1, precision="fp32", progress=False)
TINY_FLAGS = ["--model", "resnet10", "--width", "8", "--subset", "512", "--batch-size", "64", "--epochs", "2", "--eval-every", "1",
              "--precision", "fp32"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train("fast", out=out, **{**TINY, "epochs": 3, "subset": 2048})


def test_tiny_model_learns(tiny_run) -> None:
    losses = [row["train_loss"] for row in tiny_run.history]
    assert losses[-1] < losses[0] * 0.8
    assert tiny_run.test_acc > 0.5  # chance is 0.1


def test_run_directory_contents(tiny_run) -> None:
    d = tiny_run.run_dir
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "last.safetensors"):
        assert (d / name).stat().st_size > 0, name
    config = json.loads((d / "config.json").read_text())
    assert config["recipe"]["model"] == "resnet10" and config["seed"] == 0
    assert {"torch", "python", "device", "git_commit", "resnetlab"} <= set(config)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_acc", "test_acc", "images_per_s", "seconds"} <= set(rows[0])
    csv_lines = (d / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,train_acc,test_acc") and len(csv_lines) == 4
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_every_tests_only_the_chosen_epochs_and_trains_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    every = train("fast", out=tmp_path / "every", **{**TINY, "epochs": 3, "eval_every": 1})
    capsys.readouterr()
    second = train("fast", out=tmp_path / "second", **{**TINY, "epochs": 3, "eval_every": 2})
    printed = capsys.readouterr().out
    assert [r["test_acc"] is not None for r in second.history] == [False, True, True]  # the 2nd, and the last always
    assert "epoch 1/3: " in printed and "test acc not measured (--eval-every)" in printed
    # the test passes change nothing in training: the same losses and final accuracy as testing every epoch
    assert [r["train_loss"] for r in second.history] == [r["train_loss"] for r in every.history]
    assert second.test_acc == every.test_acc and second.history[1]["test_acc"] == every.history[1]["test_acc"]
    assert (tmp_path / "second" / "metrics.csv").read_text().splitlines()[1].split(",")[3] == ""  # no test acc for epoch 1
    assert (tmp_path / "second" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("epochs", "sizes", "expected"), [(3, "16,20", [16, 20, 24]), (3, "12", [12, 24, 24]),
                                                       (2, "none", [24, 24])])  # fmt: skip
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
    result = train("fast", out=tmp_path / "run", **{**TINY, "subset": 128, "epochs": epochs, "progressive_sizes": sizes})
    assert seen == [size for size in expected for _ in range(2)]  # 2 steps of 64 per epoch
    assert len(result.history) == epochs and result.test_acc is not None  # tested at 24 px


def test_checkpoint_metadata_and_no_pickle(tiny_run) -> None:
    tensors, meta = read_checkpoint(tiny_run.checkpoint)
    assert meta["model"]["name"] == "resnet10" and meta["model"]["options"]["width"] == 8
    assert meta["classes"][0] == "T-shirt/top" and meta["preprocessing"]["size"] == RECIPES["fast"].resize == 24
    assert meta["position"] == {"epoch": 3, "step": 0}
    assert any(k.startswith("optim.") for k in tensors) and "rng.cpu" in tensors


def test_eval_equals_training_log(tiny_run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_run.run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == tiny_run.test_acc
    assert result["images"] == 10_000 and len(result["per_class_accuracy"]) == 10
    assert sum(map(sum, result["confusion"])) == 10_000


def test_eval_batch_size_is_taken_as_given(tiny_run, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import resnetlab.data

    sizes: list[int] = []

    class RecordingLoader(resnetlab.data.BatchLoader):
        def __init__(self, split, batch_size, **kw) -> None:
            sizes.append(batch_size)
            super().__init__(split, batch_size, **kw)

    monkeypatch.setattr(resnetlab.data, "BatchLoader", RecordingLoader)
    # 500 was once the flag's default, and an explicit 500 was replaced by the run's own size
    assert main(["eval", str(tiny_run.run_dir), "--batch-size", "500", "--json"]) == 0
    assert main(["eval", str(tiny_run.run_dir), "--json"]) == 0
    assert sizes == [500, read_checkpoint(tiny_run.run_dir)[1]["eval_batch_size"]]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 10_000
    assert main(["eval", str(tiny_run.run_dir), "--batch-size", "0"]) == 2
    assert "batch_size must be a positive int, not 0" in capsys.readouterr().err  # BatchLoader's own check


def test_load_checkpoint_api(tiny_run) -> None:
    from resnetlab.data import load_dataset

    model = load_checkpoint(tiny_run.run_dir)
    assert not model.training and model.classes[9] == "Ankle boot"
    _, test = load_dataset("fashion-mnist")
    x = test.images[:200].float() / 255
    with torch.no_grad():
        acc = (model(x).argmax(1) == test.labels[:200]).float().mean().item()
    assert acc > 0.5


def test_predict_png_jpeg_and_bad_file(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.data import load_dataset

    _, test = load_dataset("fashion-mnist")
    png, jpg, bad = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"
    Image.fromarray(test.images[0, 0].numpy()).save(png)
    Image.fromarray(test.images[1, 0].numpy()).convert("RGB").resize((56, 56)).save(jpg)
    bad.write_text("not an image")
    code = main(["predict", str(tiny_run.run_dir), str(png), str(bad), str(jpg), "--json", "--topk", "2"])
    captured = capsys.readouterr()
    assert code == 2 and "c.png" in captured.err and "not a readable image" in captured.err
    results = json.loads(captured.out)
    assert [r["image"] for r in results] == [str(png), str(bad), str(jpg)]
    assert len(results[0]["top"]) == 2 and "error" in results[1]
    assert abs(sum(t["probability"] for t in results[2]["top"])) <= 1.0 + 1e-6


def test_d2l_recipe_matches_the_chapter() -> None:
    r = RECIPES["d2l"]
    chapter = dict(model="d2l_resnet18", dataset="fashion-mnist", epochs=10, batch_size=256, lr=0.05, resize=96,
                   optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", label_smoothing=0.0,
                   augment="none", normalize=False, init="xavier", precision="fp32", tta=False, subset=0)  # fmt: skip
    assert {k: getattr(r, k) for k in chapter} == chapter


def test_d2l_output_has_the_chapters_two_lines(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "resnetlab", "train", "--recipe", "d2l", "--subset", "256", "--epochs", "1",
         "--resize", "32", "--width", "8", "--out", str(tmp_path / "d2l")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
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
    subprocess.run(_train_cmd(reference, "--precision", precision), check=True, env=ENV, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, "--checkpoint-every", "1", "--precision", precision), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_checkpoints(proc, killed / "last.safetensors", 5)  # mid-epoch 1 (8 steps per epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, meta = read_checkpoint(killed)
    assert meta["position"]["epoch"] in (0, 1) and len(meta["history"]) == meta["position"]["epoch"]
    resumed = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--resume", str(killed)],
                             env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = _model_tensors(reference), _model_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [(r["train_loss"], r["test_acc"]) for r in rows] == [(r["train_loss"], r["test_acc"]) for r in ref_rows]


@pytest.mark.parametrize("signum, says", [(signal.SIGINT, "interrupted at epoch"), (signal.SIGTERM, "terminated (SIGTERM) at epoch")])
def test_ctrl_c_and_sigterm_save_and_exit_128_plus_the_signal(signum: int, says: str, tmp_path: Path) -> None:
    # SIGTERM (timeout, kill, Slurm and Kubernetes before they kill) ended the run without a checkpoint
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, "--checkpoint-every", "1000", "--subset", "2048"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    while "epoch 1/" not in (line := proc.stdout.readline()):  # the first epoch checkpoints; then signal mid-epoch 2
        assert line, proc.stderr.read()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "--resume" in lines[0]
    _, meta = read_checkpoint(out)
    assert meta["position"]["epoch"] == 1 and meta["position"]["step"] > 0  # saved at the signal, not at the epoch's end


def test_ctrl_c_before_a_force_runs_first_checkpoint_puts_the_old_run_back(tiny_run, tmp_path: Path) -> None:
    # the interrupt's checkpoint counted as the first one, and a mistaken --force stopped at once lost the old run
    out = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, out)
    proc = subprocess.Popen(_train_cmd(out, "--force", "--subset", "2048"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    while "training on" not in (line := proc.stdout.readline()):
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"before this run's first checkpoint; {out} holds the run it was replacing again" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_signal_during_the_first_test_pass_of_a_force_run_puts_the_old_run_back(tiny_run, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # only steps checked the flag: epoch 1's test pass went on to checkpoint, which deleted the old run
    out = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, out)
    real = loop_module.evaluate

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "evaluate", interrupted)
    with pytest.raises(loop_module.TrainingInterrupted, match="before this run's first checkpoint; .* holds the run it was replacing"):
        train("fast", out=out, force=True, **{**TINY, "subset": 128})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_names_an_unknown_field_from_the_python_api(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="drop --bogus"):  # an AttributeError for a moment
        train(resume=tiny_run.run_dir, bogus=1)


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
        (["--resize", "8", "--model", "resnet18", "--stem", "imagenet"], "a downsampling layer would see a 1x1 map; use --resize 17 or more, or --stem small"),
        (["--augment", "rotate"], "unknown augmentation"),
        (["--eval-every", "-1"], "eval every must be >= 0"),
        (["--progressive-sizes", "16,x"], "progressive sizes must be none or a comma list"),
        (["--progressive-sizes", "20,2", "--model", "resnet18", "--stem", "imagenet"], "use --progressive-sizes sizes of 17 or more"),
        (["--progressive-sizes", str(2**31)], "progressive sizes must be none or a comma list of sizes in [1, 2**31 - 1]"),
        (["--epochs", "2", "--progressive-sizes", "16,20"],  # 20 was dropped silently
         "progressive sizes 16,20 name 2 early epoch(s), but with 2 epoch(s) only 1 train before the last (which trains at --resize)"),
        (["--resize", str(10**20)], "resize must be in [0, 2**31 - 1]"),
        (["--momentum", "0"], "Nesterov momentum needs momentum; set --momentum (e.g. 0.9) or add --no-nesterov"),
        (["--width", "4"], "width 4 with channels_last crashes PyTorch's CPU kernels (fewer than 8 channels); use --width 8"),
        (["--lr", "1e39"], "lr must be at most 3.4e+38 (float32)"),
        (["--weight-decay", "1e308"], "weight decay must be at most 3.4e+38"),
        (["--width", str(10**20)], "width must be in [1, 2**31 - 1]"),
        (["--crop-padding", str(10**20), "--augment", "crop"], "crop padding must be in [0, 2**31 - 1]"),
        (["--dataset", "folder:/nonexistent?seed=99999999999999999999999"], "folder seed must be in torch's range"),
    ],
)
def test_bad_input_is_one_line_exit_2(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--subset", "64", "--out", str(out), *flags])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and "\n" not in err and message in err
    assert not out.exists() and captured.out == ""  # no empty run directory, no "training on cpu" before the error


@pytest.mark.parametrize("schedule", ["constant", "onecycle", "cosine"])
def test_every_schedule_warms_up_linearly_then_follows_its_shape(schedule: str) -> None:
    recipe = dataclasses.replace(RECIPES["fast"], schedule=schedule, warmup=0.1)
    factors = [loop_module.lr_factor(recipe, step, 100) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # 10 warm-up steps up to the peak
    after = factors[10:]
    if schedule == "constant":
        assert after == [1.0] * 90
    else:  # from the peak down towards 0, never rising
        assert after[0] == 1.0 and all(a >= b for a, b in zip(after, after[1:])) and after[-1] < 0.02
    no_warmup = dataclasses.replace(recipe, warmup=0.0)
    assert loop_module.lr_factor(no_warmup, 0, 100) == 1.0


def test_checkpoints_from_before_the_flag_rules_resume_as_they_trained() -> None:
    from resnetlab.train.recipes import WARMUP_EVERY_SCHEDULE, recipe_as_trained

    old = dataclasses.asdict(dataclasses.replace(RECIPES["fast"], momentum=0.0, schedule="constant", warmup=0.3))
    as_trained = recipe_as_trained(old, {})  # both were ignored then: plain SGD, no warm-up
    assert (as_trained.nesterov, as_trained.warmup) == (False, 0.0)
    assert recipe_as_trained(old, {WARMUP_EVERY_SCHEDULE: True}).warmup == 0.3  # a new run's warm-up is its own
    onecycle = {**old, "schedule": "onecycle"}
    assert recipe_as_trained(onecycle, {}).warmup == 0.3  # onecycle always warmed up


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_too_small_even_for_the_small_stem_names_the_size_only(stem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 px is too small for the small stem too (it takes 5 or more): "--stem small" would be no fix
    assert main(["train", "--subset", "64", "--model", "resnet10", "--stem", stem, "--resize", "4", "--out", str(tmp_path / "r")]) == 2
    smallest = {"small": 5, "imagenet": 17}[stem]
    assert capsys.readouterr().err.strip().endswith(f"a downsampling layer would see a 1x1 map; use --resize {smallest} or more")


@pytest.mark.parametrize("code, fix", [(28, "free some disk space"), (13, "check the permissions")])  # ENOSPC, EACCES
def test_a_full_disk_or_a_forbidden_path_is_one_line(code: int, fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def fail(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr("resnetlab.train.rundir.atomic_write_bytes", fail)  # config.json, the first file a run writes
    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"resnetlab: error: {os.strerror(code)} ({tmp_path / 'r' / 'config.json'}); {fix}") and err.count("\n") == 1


def test_resume_repairs_metrics_and_curves_and_keeps_the_config(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    config = (run / "config.json").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("".join(metrics.splitlines(keepends=True)[:-1]))  # killed before the last row landed
    (run / "curves.png").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"{run} finished its 3 epochs; evaluating it again" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "curves.png").exists()
    assert (run / "config.json").read_bytes() == config  # the command and commit that started it


def test_resume_refuses_a_folder_dataset_that_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    flags = ["--dataset", f"folder:{tmp_path / 'imgs'}", "--model", "resnet10", "--width", "8", "--batch-size", "4", "--epochs", "1"]
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "changed since the checkpoint (2 classes and 10 training images then, 2 and 11 now)" in capsys.readouterr().err


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


def test_a_checkpoint_whose_header_length_starts_like_a_pickle_is_read(tiny_run, tmp_path: Path) -> None:
    # safetensors begins with its header's length; 1 file in 32 has 0x80 (a pickle's first byte) first
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    path = tmp_path / "last.safetensors"
    for pad in range(0, 400, 8):  # the header grows in steps of 8 bytes: its length's low byte takes every step
        save_checkpoint(path, tensors, {**meta, "note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert read_checkpoint(path)[1]["note"] == "x" * pad
    assert main(["eval", str(path)]) == 0


@pytest.mark.parametrize(
    "edit, reason",
    [
        ({"classes": ["a", "b", "c", "d", "e"]}, "5 class names for a model with 10 outputs"),
        ({"classes": "abc"}, "classes is not a list of names"),
        ({"input_shape": None}, "input_shape None is not [C, H, W]"),
        ({"input_shape": [28, 28]}, "input_shape [28, 28] is not [C, H, W]"),
        ({"input_shape": [1, 28.5, 28]}, "input_shape [1, 28.5, 28] is not [C, H, W]"),
        ({"input_shape": [3, 28, 28]}, "with C = the model's 1 input channels"),
        ({"preprocessing": None}, "preprocessing None is not a size and one mean and std > 0 per channel"),
        ({"preprocessing": {"size": 16, "mean": [0.1, 0.2, 0.3], "std": [0.3]}}, "is not a size and one mean"),
        ({"preprocessing": {"size": 16, "mean": [0.1], "std": [0.0]}}, "is not a size and one mean and std > 0"),
        ({"tta": "no"}, "tta is 'no', not true or false"),
        ({"train_precision": "fp8"}, "train_precision is 'fp8', not fp32, bf16 or fp16"),
        ({"dataset": None}, "dataset is None, not a name"),
        ({"dataset": ...}, "incomplete resnetlab metadata (no dataset)"),
    ],
)  # fmt: skip
def test_hand_edited_checkpoint_metadata_is_one_line(edit: dict, reason: str, tiny_run, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    meta = {k: v for k, v in {**meta, **edit}.items() if v is not ...}
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, tensors, meta)
    for command in (["eval", str(path)], ["predict", str(path), "x.png"], ["train", "--resume", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resnetlab: error: {path} ") and reason in err and err.count("\n") == 1, err


def test_eval_on_a_dataset_with_other_classes_names_the_first_difference(tiny_run, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    save_checkpoint(tmp_path / "last.safetensors", tensors, {**meta, "classes": ["T-shirt/top", "jeans", *meta["classes"][2:]]})
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("resnetlab: error: fashion-mnist's class 1 is 'Trouser' but the model's is 'jeans'; "
                                       "evaluate on the dataset it was trained on (fashion-mnist)\n")  # fmt: skip


def test_non_finite_weights_are_refused_at_load(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    name = next(k for k in tensors if k.startswith("model.") and k.endswith("weight"))
    save_checkpoint(tmp_path / "last.safetensors", {**tensors, name: tensors[name] * float("nan")}, meta)
    for command in (["predict", str(tmp_path), "x.png"], ["train", "--resume", str(tmp_path)]):  # resume: unchecked
        assert main(command) == 2
        assert "holds non-finite (NaN or inf) weights" in capsys.readouterr().err


@pytest.mark.parametrize("edit, what", [({"position": {"epoch": "x", "step": 0}}, "position.epoch is 'x', not an integer >= 0"),
                                        ({"position": {"epoch": -5, "step": 0}}, "position.epoch is -5, not an integer >= 0"),
                                        ({"optimizer": "garbage"}, "optimizer is 'garbage', not a list of 2 param groups"),
                                        ({"recipe": {}}, "recipe"), ({"recipe": {"bogus": 1}}, "recipe"),
                                        ({"history": "zz"}, "history is not a list of the 3 finished epochs"),
                                        ({"sums": None}, "sums is None, not an object")])  # fmt: skip
def test_resume_of_a_checkpoint_with_damaged_resume_metadata_is_one_line(edit: dict, what: str, tiny_run, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # eval, predict and export check the metadata they read; --resume read the rest unchecked: TypeError,
    # IndexError, KeyError, AttributeError tracebacks
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    save_checkpoint(tmp_path / "last.safetensors", tensors, {**meta, **edit})
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has corrupt resume metadata ({what}); it cannot be resumed" in err


def test_resume_of_a_finished_run_evaluates_it_again(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # it said "evaluating it again" and reported the accuracy stored in its history
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    zeroed = {k: torch.zeros_like(v) if k.startswith("model.fc.") else v for k, v in tensors.items()}
    run = tmp_path / "run"
    _copy_run(tiny_run.run_dir, run)
    save_checkpoint(run / "last.safetensors", zeroed, meta)
    result = train(resume=run)
    assert result.test_acc == 0.1 != meta["history"][-1]["test_acc"]  # all logits equal: class 0 everywhere


def test_resume_accepts_a_flag_given_with_the_runs_own_value(tiny_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _copy_run(tiny_run.run_dir, run)
    train(resume=run, width=8, epochs=read_checkpoint(run)[1]["recipe"]["epochs"])  # refused before, with "drop --width"
    with pytest.raises(UsageError, match="drop --width"):
        train(resume=run, width=16)


def test_pickle_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert main(["eval", str(path)]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_resume_refuses_overrides(tiny_run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tiny_run.run_dir), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_python_api_accepts_a_recipe_object(tmp_path: Path) -> None:
    recipe = dataclasses.replace(RECIPES["fast"], model="resnet10", width=8, subset=128, epochs=1, batch_size=64)
    result = train(recipe, out=tmp_path / "r", progress=False)
    assert result.checkpoint.exists() and 0 <= result.test_acc <= 1 and np.isfinite(result.train_loss)


def test_every_recipe_field_has_a_train_flag() -> None:
    from resnetlab.cli import build_parser
    from resnetlab.train.commands import RECIPE_FLAGS
    from resnetlab.train.recipes import Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    assert set(RECIPE_FLAGS) == fields
    assert fields <= set(vars(build_parser().parse_args(["train"])))  # the parser has a flag for each
    args = build_parser().parse_args(["train", "--no-nesterov", "--warmup", "0.1", "--crop-padding", "3", "--normalize",
                                      "--init", "xavier", "--zero-init-residual", "--eval-batch-size", "7"])  # fmt: skip
    assert (args.nesterov, args.warmup, args.crop_padding, args.normalize, args.init, args.zero_init_residual,
            args.eval_batch_size) == (False, 0.1, 3, True, "xavier", True, 7)  # fmt: skip


HEAP_PROBE = r"""
import ctypes
from resnetlab.train.commands import bound_glibc_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], MallInfo2
applied = bound_glibc_heap()
libc.free(libc.malloc(9 << 20))  # by default this free raises glibc's mmap threshold above 9 MiB
block = libc.malloc(9 << 20)
print(applied, libc.mallinfo2().hblkhd >= 9 << 20)  # was the second 9 MiB block mmapped?
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_train_command_keeps_large_activations_off_the_heap() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    probe = [sys.executable, "-c", HEAP_PROBE]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.split() == ["True", "True"]
    # A user's own setting wins, and without the bound the block comes from the heap.
    user = {**env, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert subprocess.run(probe, env=user, capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_step_clock_sums_only_the_bracketed_time_and_resets() -> None:
    from resnetlab.train.dist import StepClock

    clock = StepClock(torch.device("cpu"))
    for _ in range(2):
        clock.start()
        time.sleep(0.02)
        clock.stop()
        time.sleep(0.05)  # between steps: not counted
    first = clock.take()
    assert 0.04 <= first < 0.09
    assert clock.take() == 0.0


def _train_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """`resnetlab train FLAGS --out RUN`: exit 2, one line on stderr, no run directory; the line."""
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    return err


@pytest.mark.parametrize("flag", ["--out", "--resume", "--init-from", "--recipe", "--dataset"])
def test_an_empty_path_flag_is_refused(flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # `--out ''` trained into runs/RECIPE-TIMESTAMP, `--init-from ''` from scratch and `--recipe ''` fast, silently
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--subset", "64", "--epochs", "1", flag, ""])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"resnetlab train: error: argument {flag}: an empty string; give a value" in err
    if flag in ("--out", "--resume", "--init-from"):  # the Python API says it too
        with pytest.raises(UsageError, match=f"{flag} is empty; give a path, or leave {flag} out"):
            train(**{flag[2:].replace("-", "_"): "", "subset": 64, "epochs": 1})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["eval", ""], ["export", "RUN", "--out", ""], ["predict", "--onnx", "", "a.png"],
                                  ["eval", "RUN", "--dataset", ""]])  # fmt: skip
def test_empty_strings_are_refused_by_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # eval '' said "no checkpoint at last.safetensors"; export --out '' and eval --dataset '' used the defaults
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "an empty string; give a value" in err


@pytest.mark.parametrize("device", ["meta", "xpu", "lazy", "cuda:x"])
def test_devices_resnetlab_cannot_use_are_refused(device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # torch knows meta, xpu and lazy, but training and eval need cpu, cuda or mps
    err = _train_refused(tmp_path, capsys, "--device", device, "--subset", "64")
    assert f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps" in err
    assert main(["eval", str(tmp_path / "no-such-run"), "--device", device]) == 2  # refused before the checkpoint is read
    assert f"unknown device {device!r}" in capsys.readouterr().err


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(nproc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_refused(tmp_path, capsys, "--nproc", nproc, "--subset", "64", "--epochs", "1")  # 0 once ran one process
    assert f"--nproc must be >= 1, not {nproc}" in err


def test_a_torchrun_worker_never_launches_torchrun_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse takes `--npr 2` for --nproc 2, which the launcher did not strip from the workers'
    # command line: every worker would have started its own torchrun, without end.
    from resnetlab.train import commands, loop

    launched, trained = [], []
    monkeypatch.setattr(commands, "_launch_torchrun", lambda n: launched.append(n) or 0)
    monkeypatch.setattr(loop, "train", lambda *a, **k: trained.append(k["out"]))
    assert main(["train", "--npr", "2", "--out", "w"]) == 0 and launched == [2] and trained == []
    monkeypatch.setenv("RANK", "0")  # set by torchrun in every worker
    assert main(["train", "--npr", "2", "--out", "w"]) == 0 and launched == [2] and trained == ["w"]


@pytest.mark.parametrize("flags, says", [(["--lr", "-1"], "lr must be > 0, not -1.0"),
                                         (["--out", "OUT", "--resume", "OUT"], "--resume continues the run in OUT; drop --out"),
                                         (["--precision", "fp16", "--device", "cpu"], "fp16 training needs a GPU"),
                                         (["--init-from", "OUT/none.pth"], "no weights file at OUT/none.pth")])  # fmt: skip
def test_nproc_checks_the_flags_once_before_starting_any_worker(flags: list[str], says: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # every worker made the checks and printed the same error, then torchrun its own log lines
    from resnetlab.train import commands

    monkeypatch.setattr(commands, "_launch_torchrun", lambda n: pytest.fail("torchrun started"))
    flags = [f.replace("OUT", str(tmp_path)) for f in flags]
    assert main(["train", "--nproc", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.replace("OUT", str(tmp_path)) in err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--momentum", "--label-smoothing", "--warmup"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_float_flags_are_refused(flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --lr inf and --weight-decay inf passed the range checks and training died at step 1
    err = _train_refused(tmp_path, capsys, f"{flag}={value}", "--subset", "64")
    assert f"{flag[2:].replace('-', ' ')} must be a finite number, not {float(value)}" in err


@pytest.mark.parametrize("seed", [str(-(2**63) - 1), str(2**64), "99999999999999999999999"])
def test_seed_out_of_range_is_refused(seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_refused(tmp_path, capsys, "--seed", seed, "--subset", "64")
    assert f"seed must be in torch's range [-2**63, 2**64 - 1], not {seed}" in err


def test_every_valid_seed_gives_valid_generators() -> None:
    from resnetlab.data import BatchLoader, Split
    from resnetlab.train.recipes import MAX_SEED, MIN_SEED, Recipe

    Recipe(seed=MAX_SEED).validate()
    Recipe(seed=MIN_SEED).validate()
    # Seeds from about 20,000 up once overflowed torch's seed range in the augmentation's derivation.
    split = Split(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64), ["a"])
    for seed in (20_000, 50_000, -1, MIN_SEED, MAX_SEED):
        loop_module.augment_generator(seed, 10_000, 100_000, 1_023).initial_seed()
        assert len(list(BatchLoader(split, 2, shuffle=True, seed=seed).batches(10_000))) == 3  # the shuffle's own derivation
        torch.Generator().manual_seed(seed)  # the initialisation's and the subset's
    # Seeds that always worked keep their exact generators (resumed runs and published figures depend on them).
    for seed, epoch, step, rank in [(0, 0, 0, 0), (3, 2, 117, 1), (9_000, 59, 468, 7), (18_000, 59, 1_000, 1)]:
        old = ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank
        assert loop_module.augment_generator(seed, epoch, step, rank).initial_seed() == old


@pytest.mark.parametrize("subset, resize, trained", [(65, 8, 64), (66, 8, 66), (65, 16, 65)])
def test_a_final_batch_of_one_image_is_dropped(subset: int, resize: int, trained: int, tmp_path: Path) -> None:
    # At 8 px the last feature map is 1x1, where BatchNorm cannot normalise a batch of one image;
    # any other final batch (here 2 images), and one image on 2x2 maps (16 px), is trained on as before.
    result = train("fast", out=tmp_path / "run", **{**TINY, "subset": subset, "epochs": 1, "resize": resize})
    row = result.history[0]
    assert round(row["images_per_s"] * row["seconds"]) == trained


def test_batch_size_one_on_a_1x1_map_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every batch of one image at 8 px reaches BatchNorm as one value per channel: it failed at step 0.
    out = tmp_path / "run"
    assert main(["train", "--subset", "64", "--epochs", "1", "--model", "resnet10", "--width", "8", "--resize", "8",
                 "--batch-size", "1", "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "batch size 1 gives resnet10's BatchNorm a single value per channel at 8x8" in err
    assert not out.exists()
    train("fast", out=tmp_path / "ok", **{**TINY, "subset": 64, "epochs": 1, "resize": 16, "batch_size": 1})  # 2x2 maps: fine


def _image_folder(root: Path, per_class: int, shape: tuple[int, int] = (8, 8)) -> Path:
    """A tiny folder dataset: classes a and b, ``per_class`` grey PNGs of ``shape`` (8x8) each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_progressive_sizes_on_non_square_images_need_a_square_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "imgs", 8, shape=(12, 20))
    flags = ["train", "--dataset", f"folder:{root}?holdout=0.25", "--batch-size", "4", "--epochs", "2", "--width", "8",
             "--resize", "0", "--progressive-sizes", "8"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "progressive sizes are square and these images are 12x20; set --resize too" in err
    assert main([*flags, "--resize", "12", "--out", str(tmp_path / "square")]) == 0


@pytest.mark.parametrize("per_class, options", [(4, "?holdout=0"), (1, "")])
def test_empty_test_split_is_refused_before_training(per_class: int, options: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # A whole epoch was trained before the test accuracy divided by zero (one image per class: no hold-out).
    root = _image_folder(tmp_path / "imgs", per_class)
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}{options}", "--batch-size", "2", "--epochs", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and f"folder:{root}{options} has no test images" in err and "holdout" in err
    assert not out.exists() and captured.out == ""


def test_eval_on_an_empty_test_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "imgs", 4)
    run = train("fast", out=tmp_path / "run", dataset=f"folder:{root}?holdout=0.5", model="resnet10", width=8, batch_size=2,
                epochs=1, progress=False).run_dir  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", f"folder:{root}?holdout=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"folder:{root}?holdout=0 has no test images" in err


@pytest.mark.parametrize("under", ["a-file", "a-long-name"])
def test_run_directory_that_cannot_be_created_is_one_line(under: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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


def _copy_run(run_dir: Path, dest: Path) -> dict[str, bytes]:
    import shutil

    shutil.copytree(run_dir, dest)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


@pytest.mark.parametrize("flags", [["--subset", "100000000"], ["--resize", "8", "--model", "resnet18", "--stem", "imagenet"]])
def test_force_keeps_the_old_run_until_the_new_one_passes_its_checks(flags: list[str], tiny_run, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "runF"
    before = _copy_run(tiny_run.run_dir, out)
    assert main(["train", "--out", str(out), "--force", "--epochs", "1", *flags]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # once deleted at the start, before the checks


def test_an_out_through_a_missing_folder_and_dotdot_is_the_run_it_names(tiny_run, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # missing/../run is run: it exists, so without --force it is refused and kept (it was deleted)
    before = _copy_run(tiny_run.run_dir, tmp_path / "run")
    out = tmp_path / "missing" / ".." / "run"
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert not (tmp_path / "missing").exists()


def test_a_run_directory_without_a_checkpoint_is_not_offered_for_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "last.safetensors").read_bytes() != before["last.safetensors"]


@pytest.mark.parametrize("stale_aside", [False, True])
def test_force_keeps_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(stale_aside: bool, tiny_run, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
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


def test_resume_of_a_force_run_stopped_before_its_first_checkpoint_names_the_old_run(tiny_run, tmp_path: Path,
                                                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "runK"
    before = _copy_run(tiny_run.run_dir, out / ".previous-run")
    (out / "config.json").write_bytes(before["config.json"])
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the run it was replacing is in {out / '.previous-run'}" in err


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("config, says", [(None, "holds files but no resnetlab run; a run needs a new or empty folder"),
                                          ('{"mine": 1}', "holds config.json but no resnetlab run")])  # fmt: skip
def test_a_folder_that_holds_no_run_is_refused_even_with_force(force: list[str], config: str | None, says: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
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


def test_a_force_run_killed_before_its_first_checkpoint_names_the_run_it_set_aside(tiny_run, tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "runK"
    before = _copy_run(tiny_run.run_dir, out / ".previous-run")  # what a SIGKILL between set-aside and checkpoint leaves
    (out / "config.json").write_bytes(before["config.json"])
    assert main(["train", *TINY_FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"holds no checkpoint to resume (the run it was replacing is in {out / '.previous-run'})" in err
    train("fast", out=out, force=True, **{**TINY, "subset": 64, "epochs": 1})  # --force replaces that old run too
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


@pytest.mark.parametrize("flags", [["--out", "OTHER"], ["--force"], ["--out", "OTHER", "--force"], ["--init-from", "OTHER"],
                                   ["--recipe", "d2l"], ["--recipe", "fast"]])  # --recipe was ignored silently
def test_resume_refuses_out_and_force(flags: list[str], tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    before = _copy_run(tiny_run.run_dir, run)
    other = tmp_path / "other"
    flags = [str(other) if f == "OTHER" else f for f in flags]
    assert main(["train", "--resume", str(run), *flags]) == 2  # both were silently ignored, and config.json rewritten
    err = capsys.readouterr().err.strip()
    dropped = " and ".join(f for f in flags if f.startswith("--"))
    assert "\n" not in err and f"--resume continues the run in {run}; drop {dropped}" in err
    assert not other.exists() and {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(existing: bool, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
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


def test_init_from_takes_a_run_directory(tiny_run, tmp_path: Path) -> None:
    # every other command takes a run directory; --init-from said "no weights file at RUN"
    result = train("fast", out=tmp_path / "ft", init_from=str(tiny_run.run_dir), **{**TINY, "subset": 64, "epochs": 1, "lr": 1e-9})
    start, tuned = load_checkpoint(tiny_run.run_dir).net.state_dict(), load_checkpoint(result.run_dir).net.state_dict()
    assert all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in start if k.endswith("conv1.weight"))
