"""The checkpoint file (checkpoint.py): metadata, no pickle, hand-edited metadata, non-finite weights.

Damaged checkpoint files have their own tests in test_checkpoint_damage.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.train import RECIPES


def test_checkpoint_metadata_and_no_pickle(tiny_run) -> None:
    tensors, meta = read_checkpoint(tiny_run.checkpoint)
    assert meta["model"]["name"] == "resnet10" and meta["model"]["options"]["width"] == 8
    assert meta["classes"][0] == "T-shirt/top" and meta["preprocessing"]["size"] == RECIPES["fast"].resize == 24
    assert meta["position"] == {"epoch": 3, "step": 0}
    assert any(k.startswith("optim.") for k in tensors) and "rng.cpu" in tensors


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
)
def test_hand_edited_checkpoint_metadata_is_one_line(
    edit: dict, reason: str, tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    meta = {k: v for k, v in {**meta, **edit}.items() if v is not ...}
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, tensors, meta)
    for command in (["eval", str(path)], ["predict", str(path), "x.png"], ["train", "--resume", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resnetlab: error: {path} ") and reason in err and err.count("\n") == 1, err


def test_non_finite_weights_are_refused_at_load(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    name = next(k for k in tensors if k.startswith("model.") and k.endswith("weight"))
    save_checkpoint(tmp_path / "last.safetensors", {**tensors, name: tensors[name] * float("nan")}, meta)
    for command in (["predict", str(tmp_path), "x.png"], ["train", "--resume", str(tmp_path)]):  # resume: unchecked
        assert main(command) == 2
        assert "holds non-finite (NaN or inf) weights" in capsys.readouterr().err


def test_pickle_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert main(["eval", str(path)]) == 2
    assert "never unpickles" in capsys.readouterr().err
