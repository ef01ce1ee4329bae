"""The whitened stem (models/whiten.py, --whiten-stem): whitening, the frozen filters, resume, refusals."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, _train_refused
from resnetlab.checkpoint import read_checkpoint
from resnetlab.data import Preprocess, load_dataset, to_float
from resnetlab.models import create_model, first_conv, whiten_first_conv, whitened_filters
from resnetlab.train import RECIPES, train
from resnetlab.train import loop as loop_module
from resnetlab.train.setup import seeded_subset
from resnetlab.train.step import make_optimizer


def _stem_output_cov(
    weight: torch.Tensor, images: torch.Tensor, n: int, stride: int = 1, padding: int = 1
) -> torch.Tensor:
    """The covariance (about 0) of the first ``n`` filters' outputs on ``images``."""
    y = F.conv2d(images, weight[:n].float(), stride=stride, padding=padding).permute(0, 2, 3, 1).reshape(-1, n)
    return (y.T @ y / len(y)).double()


@pytest.mark.parametrize(
    "model, options, in_chans, expected",
    [
        ("resnet10", {"stem": "small", "width": 32}, 1, 18),  # 9 eigenvectors, with their negations; 14 filters train
        ("resnet10", {"stem": "small", "width": 8}, 1, 8),  # half the filters: 4 eigenvectors of 9
        ("resnet10", {"stem": "small", "width": 32}, 3, 32),  # 27 eigenvectors, 16 used
        ("d2l_resnet18", {}, 1, 64),  # 7x7 with a bias: 32 of 49 eigenvectors
    ],
)
def test_whitening_decorrelates_the_stems_outputs_to_unit_variance(
    model: str, options: dict, in_chans: int, expected: int
) -> None:
    torch.manual_seed(0)
    net = create_model(model, in_chans=in_chans, **options)
    conv = first_conv(net)
    before = conv.weight.detach().clone()
    # correlated inputs: smoothed noise, as neighbouring pixels of an image are
    images = F.avg_pool2d(torch.randn(200, in_chans, 28, 28), 3, 1, 1) * 3 + 0.5
    assert whiten_first_conv(net, [images]) == whitened_filters(conv) == expected
    half, w = expected // 2, conv.weight.detach()
    assert torch.equal(w[half:expected], -w[:half])
    assert torch.equal(w[expected:], before[expected:])  # the rest keep their initialisation
    if conv.bias is not None:
        assert not conv.bias[:expected].any()
    cov = _stem_output_cov(w, images, half, conv.stride[0], conv.padding[0])
    # identity up to the eigenvalue floor, which only shrinks the directions the data barely spans
    assert torch.allclose(cov.diagonal(), torch.ones(half, dtype=torch.float64), atol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3


def test_whitening_reads_its_batches_only_as_far_as_the_patches_it_needs() -> None:
    torch.manual_seed(0)
    images = F.avg_pool2d(torch.randn(12, 1, 10, 10), 3, 1, 1)
    nets = [create_model("resnet10", stem="small", width=16) for _ in range(3)]
    whiten_first_conv(nets[0], [images[:5]])
    read = []

    def batches():  # the first five images' patches, across two batches and a chunk of one image each
        for batch in (images[:3], images[3:8], images[8:]):
            read.append(len(batch))
            yield batch

    whiten_first_conv(nets[1], batches(), max_patches=5 * 100, chunk_bytes=1)
    assert read == [3, 5]  # the third batch is never read
    a, b = (first_conv(n).weight for n in nets[:2])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        whiten_first_conv(nets[2], [])
    with pytest.raises(ValueError, match="no Conv2d"):
        whiten_first_conv(torch.nn.Linear(3, 3), [torch.zeros(1, 3)])


def test_the_whitened_stem_is_kept_out_of_weight_decay() -> None:
    net = create_model("resnet10", stem="small", width=8)
    stem = first_conv(net).weight
    for whiten, decayed in ((False, True), (True, False)):
        recipe = dataclasses.replace(RECIPES["fast"], whiten_stem=whiten)
        groups = make_optimizer(recipe, net, 0.1).param_groups
        assert any(p is stem for p in groups[0 if decayed else 1]["params"])
        assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0


def _whitening_images(run_dir: Path, subset: int, seed: int) -> torch.Tensor:
    """The run's training images (its seeded subset) as the network saw them, by its checkpoint's preprocessing."""
    _, meta = read_checkpoint(run_dir)
    train_split, _ = load_dataset("fashion-mnist")
    images = seeded_subset(train_split, subset, seed).images
    return Preprocess.from_config(meta["preprocessing"])(to_float(images))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 forced: slow on AVX2, but the frozen rows must hold
def test_training_keeps_the_whitened_filters_exact_and_trains_the_rest(precision: str, tmp_path: Path) -> None:
    settings = {**TINY, "width": 16, "precision": precision, "whiten_stem": True}
    run_dir = train("fast", out=tmp_path / "run", **settings).run_dir
    tensors, meta = read_checkpoint(run_dir)
    assert meta["recipe"]["whiten_stem"] is True
    # all 16 filters are whitened (8 eigenvectors and their negations): exact after two epochs of updates
    weight = tensors["model.conv1.weight"]
    assert torch.equal(weight[8:], -weight[:8])
    cov = _stem_output_cov(weight, _whitening_images(run_dir, TINY["subset"], 0), 8)
    assert torch.allclose(cov.diagonal(), torch.ones(8, dtype=torch.float64), atol=0.05)  # not decayed
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]  # it learns


def test_a_wider_stem_trains_its_other_filters(tmp_path: Path) -> None:
    run_dir = train("fast", out=tmp_path / "run", **{**TINY, "width": 32, "epochs": 1, "whiten_stem": True}).run_dir
    weight = read_checkpoint(run_dir)[0]["model.conv1.weight"]
    torch.manual_seed(0)
    initial = first_conv(create_model("resnet10", stem="small", width=32)).weight
    assert torch.equal(weight[9:18], -weight[:9])
    assert not torch.equal(weight[18:], initial[18:].detach())


def test_an_interrupted_whitened_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**TINY, "width": 16, "whiten_stem": True}
    reference = train("fast", out=tmp_path / "reference", **settings).run_dir
    real, calls = loop_module.train_inputs, {"n": 0}

    def interrupted_at_step_10(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 10:  # epoch 2, step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(loop_module, "train_inputs", interrupted_at_step_10)
    out = tmp_path / "interrupted"
    with pytest.raises(loop_module.TrainingInterrupted):
        train("fast", out=out, **settings)
    monkeypatch.setattr(loop_module, "train_inputs", real)
    train(resume=out, progress=False)
    a, b = read_checkpoint(reference)[0], read_checkpoint(out)[0]
    model = [k for k in a if k.startswith("model.")]
    assert model and all(torch.equal(a[k], b[k]) for k in model)


def test_pretrained_weights_replace_a_recipes_whitened_stem(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(RECIPES, "fast", dataclasses.replace(RECIPES["fast"], whiten_stem=True))
    settings = {**TINY, "subset": 64, "epochs": 1, "lr": 1e-9}
    result = train("fast", out=tmp_path / "ft", init_from=str(tiny_run.run_dir), **settings)
    tensors, meta = read_checkpoint(result.run_dir)
    assert meta["recipe"]["whiten_stem"] is False  # the run says what it trained
    start = read_checkpoint(tiny_run.run_dir)[0]["model.conv1.weight"]
    assert torch.allclose(tensors["model.conv1.weight"], start, atol=1e-6)


def test_init_from_and_whiten_stem_are_refused_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights.pt"
    torch.save({}, weights)
    err = _train_refused(tmp_path, capsys, "--whiten-stem", "--init-from", str(weights))
    assert "--init-from and --whiten-stem" in err and "drop one" in err
