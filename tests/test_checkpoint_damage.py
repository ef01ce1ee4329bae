"""A damaged checkpoint is refused in one line naming the file and the field.

Never a traceback, never a silent wrong result.

Two tiny runs (resnet10 width 8, SGD and AdamW, on a synthetic 2-class image folder, fp32) are
trained once per module and stopped mid-epoch, so that their checkpoints hold optimizer state, a
finished epoch and the running sums of the current one. Each test copies a run and rewrites its
checkpoint with safetensors' own ``save_file`` and the same metadata, one change made, as a user
(or a damaged disk) would.
Also here: image folders whose links put one image in two classes, and a --force run's old run
named by eval, predict and export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.checkpoint import CHECKPOINT_NAME
from resnetlab.cli import main
from resnetlab.errors import DataError
from resnetlab.train import loop as loop_module

TINY = dict(
    model="resnet10",
    width=8,
    stem="small",
    resize=0,
    batch_size=8,
    epochs=2,
    eval_every=1,
    precision="fp32",
    device="cpu",
    progress=False,
)
STOP_AT = 9  # the 9th step of 12 (6 per epoch): epoch 2, step 3, with epoch 1 in the history


def _image_folder(root: Path, classes: dict[str, int], n: int = 24) -> Path:
    """``root/<class>/<i>.png``: n noisy 12x12 grey images per class, around the class's grey level."""
    rng = np.random.default_rng(0)
    for name, level in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(level, 30, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _stopped_run(out: Path, data: Path, optimizer: str) -> Path:
    """Train until SIGINT arrives in step STOP_AT: the loop checkpoints after that step and stops."""
    calls = {"n": 0}
    real = loop_module.train_inputs

    def interrupting(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)  # taken as Ctrl-C: the stop flag, checked after the step
        return real(*args)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(loop_module, "train_inputs", interrupting)
        with pytest.raises(loop_module.TrainingInterrupted):
            loop_module.train("fast", out=out, dataset=f"folder:{data}", optimizer=optimizer, **TINY)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damage")
    data = _image_folder(root / "data", {"dark": 60, "light": 190})
    return {opt: _stopped_run(root / opt, data, opt) for opt in ("sgd", "adamw")}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["resnetlab"])
    return load_file(str(path)), meta


def _damaged(run: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Path:
    """A copy of ``run`` whose checkpoint was rewritten by safetensors.torch.save_file after ``edit``."""
    from safetensors.torch import save_file

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tensors, meta = _read(copy / CHECKPOINT_NAME)
    edit(tensors, meta)
    save_file(tensors, str(copy / CHECKPOINT_NAME), metadata={"resnetlab": json.dumps(meta)})
    return copy


def set_meta(*keys: Any, value: Any) -> Callable[[dict, dict], None]:
    """An edit: metadata[keys[0]][keys[1]]... = value."""

    def edit(tensors: dict, meta: dict) -> None:
        for key in keys[:-1]:
            meta = meta[key]
        meta[keys[-1]] = value

    return edit


def set_tensor(name: str, change: Callable[[torch.Tensor | None], torch.Tensor | None]) -> Callable[[dict, dict], None]:
    """An edit: tensors[name] = change(tensors[name]) (None: deleted)."""

    def edit(tensors: dict, meta: dict) -> None:
        value = change(tensors.get(name))
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value

    return edit


def both(*edits: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    def edit(tensors: dict, meta: dict) -> None:
        for e in edits:
            e(tensors, meta)

    return edit


def drop_optimizer_state(tensors: dict, meta: dict) -> None:
    for key in [k for k in tensors if k.startswith("optim.")]:
        del tensors[key]


ALL = ("eval", "predict", "export", "resume")
RESUME = ("resume",)
COUNTED = {"loss": 1.0, "correct": 1, "count": 2, "seconds": 1.0, "compute_seconds": 1.0}

# (run, edit, what the error says, the commands that must refuse it)
CASES = {
    # weights: every command reads them; another dtype was cast silently (eval at chance, export "verified")
    "int8 weight": (
        "sgd",
        set_tensor("model.conv1.weight", lambda t: t.to(torch.int8)),
        "conv1.weight is int8 in the file, float32 in the model",
        ALL,
    ),
    "fp16 weight": (
        "sgd",
        set_tensor("model.fc.weight", lambda t: t.half()),
        "fc.weight is float16 in the file, float32",
        ALL,
    ),
    "float batch count": (
        "sgd",
        set_tensor("model.bn1.num_batches_tracked", lambda t: t.float()),
        "bn1.num_batches_tracked is float32 in the file, int64 in the model",
        ALL,
    ),
    "tta_translate": ("sgd", set_meta("tta_translate", value=99), "tta_translate is 99, not an integer in [0, 8]", ALL),
    # the recipe, through Recipe's own checks: a TypeError traceback before
    "recipe lr": ("sgd", set_meta("recipe", "lr", value="fast"), "recipe: lr must be a number, not 'fast'", RESUME),
    "recipe nesterov": (
        "sgd",
        set_meta("recipe", "nesterov", value="yes"),
        "recipe: nesterov must be true or false",
        RESUME,
    ),
    "recipe epochs": ("sgd", set_meta("recipe", "epochs", value=0), "recipe: epochs must be >= 1, not 0", RESUME),
    # generator states: a RuntimeError traceback before
    "rng.cpu 3 bytes": (
        "sgd",
        set_tensor("rng.cpu", lambda t: t[:3]),
        "rng.cpu is (3,) in the file, (5056,) expected",
        RESUME,
    ),
    "rng.cpu int64": (
        "sgd",
        set_tensor("rng.cpu", lambda t: t.long()),
        "rng.cpu is int64 in the file, uint8 expected",
        RESUME,
    ),
    "rng.cuda 3 bytes": (
        "sgd",
        set_tensor("rng.cuda", lambda t: torch.zeros(3, dtype=torch.uint8)),
        "rng.cuda is (3,) in the file, (16,) expected",
        RESUME,
    ),
    # optimizer state: resumed silently before
    "momentum deleted": (
        "sgd",
        set_tensor("optim.5.momentum_buffer", lambda t: None),
        "missing ['optim.5.momentum_buffer']",
        RESUME,
    ),
    "all optimizer state deleted": ("sgd", drop_optimizer_state, "missing ['optim.0.momentum_buffer'", RESUME),
    "momentum fp16": (
        "sgd",
        set_tensor("optim.0.momentum_buffer", lambda t: t.half()),
        "optim.0.momentum_buffer is float16 in the file, float32 expected",
        RESUME,
    ),
    "momentum flat": (
        "sgd",
        set_tensor("optim.0.momentum_buffer", lambda t: t.flatten()),
        "optim.0.momentum_buffer is (72,) in the file, (8, 1, 3, 3) expected",
        RESUME,
    ),
    "unknown state": (
        "sgd",
        set_tensor("optim.0.bogus", lambda t: torch.zeros(1)),
        "unexpected ['optim.0.bogus']",
        RESUME,
    ),
    "adamw step int64": (
        "adamw",
        set_tensor("optim.0.step", lambda t: t.long()),
        "optim.0.step is int64 in the file, float32 expected",
        RESUME,
    ),
    "adamw exp_avg_sq deleted": (
        "adamw",
        set_tensor("optim.3.exp_avg_sq", lambda t: None),
        "missing ['optim.3.exp_avg_sq']",
        RESUME,
    ),
    "optimizer groups empty": (
        "sgd",
        set_meta("optimizer", value=[]),
        "optimizer is [], not a list of 2 param groups",
        RESUME,
    ),
    "optimizer lr text": ("sgd", set_meta("optimizer", 0, "lr", value="x"), "optimizer[0].lr is 'x'", RESUME),
    "optimizer params key": (
        "sgd",
        set_meta("optimizer", 1, "params", value=[0]),
        "optimizer[1].params is [0]",
        RESUME,
    ),
    "optimizer momentum missing": (
        "sgd",
        lambda t, m: m["optimizer"][1].pop("momentum"),
        "optimizer[1].momentum is missing",
        RESUME,
    ),
    "adamw betas": (
        "adamw",
        set_meta("optimizer", 0, "betas", value=[0.9, 5]),
        "optimizer[0].betas is [0.9, 5]",
        RESUME,
    ),
    # position, sums, history, scaler
    "sums negative": ("sgd", set_meta("sums", "count", value=-3), "sums.count is -3, not an integer >= 0", RESUME),
    "sums text": ("sgd", set_meta("sums", "loss", value="x"), "sums.loss is 'x', not a number >= 0", RESUME),
    "sums more correct": ("sgd", set_meta("sums", "correct", value=10**6), "do not fit position", RESUME),
    "interval text": ("sgd", set_meta("interval", value=[1]), "interval is [1], not an object", RESUME),
    "interval more correct": (
        "sgd",
        set_meta("interval", value={"loss": 1.0, "correct": 9, "count": 8}),
        "do not fit position",
        RESUME,
    ),
    "curve not a list": ("sgd", set_meta("curve", value={}), "curve is not a list of rows", RESUME),
    "curve train_acc": (
        "sgd",
        set_meta(
            "curve",
            value=[{"epoch": 1, "step": 1, "epoch_fraction": 0.5, "train_loss": 1.0, "train_acc": 2.0, "lr": 0.1}],
        ),
        "curve[0].train_acc is 2.0, not a number in [0, 1]",
        RESUME,
    ),
    "curve epoch ahead": (
        "sgd",
        set_meta(
            "curve",
            value=[{"epoch": 9, "step": 1, "epoch_fraction": 0.5, "train_loss": 1.0, "train_acc": 0.5, "lr": 0.1}],
        ),
        "curve[0].epoch is 9, past position",
        RESUME,
    ),
    "history test_acc": (
        "sgd",
        set_meta("history", 0, "test_acc", value="x"),
        "history[0].test_acc is 'x', not a number in [0, 1]",
        RESUME,
    ),
    "history seconds": (
        "sgd",
        set_meta("history", 0, "seconds", value=0),
        "history[0].seconds is 0, not a number > 0",
        RESUME,
    ),
    "history epoch": ("sgd", set_meta("history", 0, "epoch", value=5), "history[0].epoch is 5, not 1", RESUME),
    "position past the epochs": (
        "sgd",
        set_meta("position", "epoch", value=3),
        "position.epoch is 3, past the recipe's 2 epochs",
        RESUME,
    ),
    "position past the steps": (
        "sgd",
        both(set_meta("position", value={"epoch": 1, "step": 10**6}), set_meta("sums", value=COUNTED)),
        "position.step is 1000000, past the 6 steps of an epoch",
        RESUME,
    ),
    "scaler": ("sgd", set_meta("scaler", value={"scale": "x"}), "scaler.scale is 'x', not a number > 0", RESUME),
}


def _command(name: str, run: Path) -> list[str]:
    return {
        "eval": ["eval", str(run)],
        "predict": ["predict", str(run), str(run / "x.png")],
        "export": ["export", str(run)],
        "resume": ["train", "--resume", str(run)],
    }[name]


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_field(
    case: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    which, edit, says, commands = CASES[case]
    run = _damaged(runs[which], tmp_path, edit)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    for command in commands:
        if command == "export" and any(
            __import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxruntime")
        ):
            continue
        code = main(_command(command, run))
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (command, err)
        assert err.startswith(f"resnetlab: error: {run / CHECKPOINT_NAME}") and says in err, (command, err)
    assert {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file()
    } == before  # nothing written (no export, no run files)


def test_damage_only_a_resume_reads_leaves_eval_working(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the resume error says "eval, predict and export may still use it": they do
    run = _damaged(runs["sgd"], tmp_path, set_tensor("rng.cpu", lambda t: t[:3]))
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4  # 2 of each class held out


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_an_undamaged_checkpoint_rewritten_by_safetensors_still_resumes_and_evaluates(
    which: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _damaged(runs[which], tmp_path, lambda tensors, meta: None)
    assert main(["eval", str(run)]) == 0
    image = next(Path(_read(run / CHECKPOINT_NAME)[1]["dataset"].removeprefix("folder:")).glob("dark/*.png"))
    assert main(["predict", str(run), str(image)]) == 0
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert "resuming" in capsys.readouterr().out
    assert _read(run / CHECKPOINT_NAME)[1]["position"] == {"epoch": 2, "step": 0}


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_a_checkpoint_of_the_foreach_optimizer_resumes_fused(
    which: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def foreach(tensors: dict, meta: dict) -> None:  # as written before the optimizers were fused
        for group in meta["optimizer"]:
            group.update(foreach=True, fused=None)

    run = _damaged(runs[which], tmp_path, foreach)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert all(g["fused"] is True and g["foreach"] is None for g in _read(run / CHECKPOINT_NAME)[1]["optimizer"])


def test_an_optimizer_that_never_stepped_may_have_no_state(runs: dict[str, Path], tmp_path: Path) -> None:
    # an fp16 run's GradScaler skips the steps whose gradients overflowed: its first checkpoints may hold no
    # optimizer state; every other checkpoint holds it whole (deleting it all is refused, above)
    from resnetlab.checkpoint import read_checkpoint
    from resnetlab.train.request import _resume_state

    scaler = {
        "scale": 32768.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    run = _damaged(runs["sgd"], tmp_path, both(drop_optimizer_state, set_meta("scaler", value=scaler)))
    tensors, meta = read_checkpoint(run)
    assert _resume_state(tensors, meta, run).optimizer == "sgd"


# ----------------------------------------------------------------------------------------------
# Image folders: links that put the same image in two classes, or loop


def _link(root: Path, name: str, target: str) -> None:
    (root / name).symlink_to(target)


@pytest.mark.parametrize(
    "name, target, says",
    [
        ("c", ".", "c is a link to {root}, which holds the whole dataset"),  # every image twice, under two labels
        ("c", "..", "which holds the whole dataset"),
        ("c", "dark", "c is a link to {root}/dark, which overlaps class folder {root}/dark"),
        ("c", "dark/sub", "c is a link to {root}/dark/sub, which overlaps class folder {root}/dark"),
        ("c", "c", "c is a symbolic link that loops"),  # it was skipped silently
        ("dark/copy.png", "../light/0.png", "are the same file ({root}/light/0.png), in classes"),
        ("dark/again.png", "0.png", "are the same file ({root}/dark/0.png), in class dark twice"),
    ],
)
def test_a_folder_link_that_puts_an_image_in_two_classes_or_loops_is_refused(
    name: str, target: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnetlab.data import load_dataset

    root = _image_folder(tmp_path / "data", {"dark": 60, "light": 190}, n=4)
    (root / "dark" / "sub").mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "dark" / "sub" / "s.png")
    _link(root, name, target)
    with pytest.raises(DataError) as info:
        load_dataset(f"folder:{root}", download=False)
    message = str(info.value)
    assert "\n" not in message and says.format(root=root.resolve()) in message, message
    assert main(["data", "info", f"folder:{root}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.format(root=root.resolve()) in err


def test_a_class_folder_linked_to_images_elsewhere_is_accepted(tmp_path: Path) -> None:
    # images kept on another disk, linked in as a class: legitimate
    from resnetlab.data import load_dataset

    root = _image_folder(tmp_path / "data", {"dark": 60}, n=4)
    _image_folder(tmp_path / "elsewhere", {"light": 190}, n=4)
    _link(root, "light", str(tmp_path / "elsewhere" / "light"))
    train, test = load_dataset(f"folder:{root}", download=False)
    assert train.classes == ["dark", "light"] and len(train) + len(test) == 8


# ----------------------------------------------------------------------------------------------
# A --force run stopped before its first checkpoint: the old run waits in .previous-run/


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
@pytest.mark.parametrize("given", ["dir", "file"])
def test_eval_predict_and_export_name_the_run_a_force_run_set_aside(
    command: str, given: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(
        runs["sgd"], out / ".previous-run"
    )  # what a kill between the set-aside and the first checkpoint leaves
    shutil.copy(out / ".previous-run" / "config.json", out / "config.json")
    path = out if given == "dir" else out / CHECKPOINT_NAME
    assert main([command, str(path), *(["x.png"] if command == "predict" else [])]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"no checkpoint at {out / CHECKPOINT_NAME}: a --force run was stopped before its first one" in err
    )
    assert f"the run it was replacing is in {out / '.previous-run'}" in err
    assert main(["eval", str(out / ".previous-run")]) == 0  # as the message offers
