"""Using a trained model (inference.py): load_checkpoint and `resnetlab predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnetlab.cli import main
from resnetlab.train import load_checkpoint


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_translation_tta_averages_the_image_and_its_two_shifts_with_black_borders(channels_last: bool) -> None:
    from torch import nn

    from resnetlab.data import Preprocess
    from resnetlab.inference import Classifier

    x = torch.rand(2, 1, 4, 4)
    pre = Preprocess(None, mean=0.5, std=0.25)  # black (0) is -2 once normalised
    classifier = Classifier(nn.Flatten(), pre, ["a"], tta_translate=1, channels_last=channels_last)
    black = torch.zeros(2, 1, 6, 6)
    black[..., 1:5, 1:5] = x  # the image with a black border of 1 pixel: each shift a 4x4 window of it
    shifted = [black[..., :4, :4], black[..., 2:, 2:]]
    want = (pre(x) / 2 + (pre(shifted[0]) + pre(shifted[1])) / 4).flatten(1)
    torch.testing.assert_close(classifier(x), want)
    assert Classifier(nn.Flatten(), pre, ["a"])(x).equal(pre(x).flatten(1))  # no shifts: the image alone
