"""Evaluation (train/evaluate.py and `resnetlab eval`).

Covered: the log's accuracy, the batch size, class names, empty test splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import _image_folder
from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.train import train


def test_eval_equals_training_log(tiny_run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_run.run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == tiny_run.test_acc
    assert result["images"] == 10_000 and len(result["per_class_accuracy"]) == 10
    assert sum(map(sum, result["confusion"])) == 10_000


def test_eval_batch_size_is_taken_as_given(
    tiny_run, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_eval_on_a_dataset_with_other_classes_names_the_first_difference(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnetlab.checkpoint import save_checkpoint

    tensors, meta = read_checkpoint(tiny_run.run_dir)
    save_checkpoint(
        tmp_path / "last.safetensors", tensors, {**meta, "classes": ["T-shirt/top", "jeans", *meta["classes"][2:]]}
    )
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "resnetlab: error: fashion-mnist's class 1 is 'Trouser' but the model's is 'jeans'; "
        "evaluate on the dataset it was trained on (fashion-mnist)\n"
    )


@pytest.mark.parametrize("per_class, options", [(4, "?holdout=0"), (1, "")])
def test_empty_test_split_is_refused_before_training(
    per_class: int, options: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A whole epoch was trained before the test accuracy divided by zero (one image per class: no hold-out).
    root = _image_folder(tmp_path / "imgs", per_class)
    out = tmp_path / "run"
    assert (
        main(["train", "--dataset", f"folder:{root}{options}", "--batch-size", "2", "--epochs", "1", "--out", str(out)])
        == 2
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and f"folder:{root}{options} has no test images" in err and "holdout" in err
    assert not out.exists() and captured.out == ""


def test_eval_on_an_empty_test_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_folder(tmp_path / "imgs", 4)
    run = train(
        "fast",
        out=tmp_path / "run",
        dataset=f"folder:{root}?holdout=0.5",
        model="resnet10",
        width=8,
        batch_size=2,
        epochs=1,
        progress=False,
    ).run_dir
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", f"folder:{root}?holdout=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"folder:{root}?holdout=0 has no test images" in err
