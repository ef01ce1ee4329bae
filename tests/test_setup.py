"""Building a run (train/setup.py): its data and loaders, the size checks, --init-from weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, _image_folder
from resnetlab.cli import main
from resnetlab.train import load_checkpoint, train


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_too_small_even_for_the_small_stem_names_the_size_only(
    stem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4 px is too small for the small stem too (it takes 5 or more): "--stem small" would be no fix
    assert (
        main(
            [
                "train",
                "--subset",
                "64",
                "--model",
                "resnet10",
                "--stem",
                stem,
                "--resize",
                "4",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    smallest = {"small": 5, "imagenet": 17}[stem]
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"a downsampling layer would see a 1x1 map; use --resize {smallest} or more")
    )


def test_resume_refuses_a_folder_dataset_that_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    flags = [
        "--dataset",
        f"folder:{tmp_path / 'imgs'}",
        "--model",
        "resnet10",
        "--width",
        "8",
        "--batch-size",
        "4",
        "--epochs",
        "1",
    ]
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert (
        "changed since the checkpoint (2 classes and 10 training images then, 2 and 11 now)" in capsys.readouterr().err
    )


@pytest.mark.parametrize("subset, resize, trained", [(65, 8, 64), (66, 8, 66), (65, 16, 65)])
def test_a_final_batch_of_one_image_is_dropped(subset: int, resize: int, trained: int, tmp_path: Path) -> None:
    # At 8 px the last feature map is 1x1, where BatchNorm cannot normalise a batch of one image;
    # any other final batch (here 2 images), and one image on 2x2 maps (16 px), is trained on as before.
    result = train("fast", out=tmp_path / "run", **{**TINY, "subset": subset, "epochs": 1, "resize": resize})
    row = result.history[0]
    assert round(row["images_per_s"] * row["seconds"]) == trained


def test_batch_size_one_on_a_1x1_map_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every batch of one image at 8 px reaches BatchNorm as one value per channel: it failed at step 0.
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--subset",
                "64",
                "--epochs",
                "1",
                "--model",
                "resnet10",
                "--width",
                "8",
                "--resize",
                "8",
                "--batch-size",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "batch size 1 gives resnet10's BatchNorm a single value per channel at 8x8" in err
    assert not out.exists()
    train(
        "fast", out=tmp_path / "ok", **{**TINY, "subset": 64, "epochs": 1, "resize": 16, "batch_size": 1}
    )  # 2x2 maps: fine


def test_progressive_sizes_on_non_square_images_need_a_square_resize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "imgs", 8, shape=(12, 20))
    flags = [
        "train",
        "--dataset",
        f"folder:{root}?holdout=0.25",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--width",
        "8",
        "--resize",
        "0",
        "--progressive-sizes",
        "8",
    ]
    assert main([*flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "progressive sizes are square and these images are 12x20; set --resize too" in err
    assert main([*flags, "--resize", "12", "--out", str(tmp_path / "square")]) == 0


def test_init_from_takes_a_run_directory(tiny_run, tmp_path: Path) -> None:
    # every other command takes a run directory; --init-from said "no weights file at RUN"
    result = train(
        "fast", out=tmp_path / "ft", init_from=str(tiny_run.run_dir), **{**TINY, "subset": 64, "epochs": 1, "lr": 1e-9}
    )
    start, tuned = load_checkpoint(tiny_run.run_dir).net.state_dict(), load_checkpoint(result.run_dir).net.state_dict()
    assert all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in start if k.endswith("conv1.weight"))
