"""Recipes (train/recipes.py): the d2l table, recipes of old checkpoints, a flag for every field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from resnetlab.train import RECIPES


def test_d2l_recipe_matches_the_chapter() -> None:
    r = RECIPES["d2l"]
    chapter = dict(
        model="d2l_resnet18",
        dataset="fashion-mnist",
        epochs=10,
        batch_size=256,
        lr=0.05,
        resize=96,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        label_smoothing=0.0,
        augment="none",
        normalize=False,
        init="xavier",
        precision="fp32",
        tta=False,
        subset=0,
    )
    assert {k: getattr(r, k) for k in chapter} == chapter


def test_checkpoints_from_before_the_flag_rules_resume_as_they_trained() -> None:
    from resnetlab.train.recipes import WARMUP_EVERY_SCHEDULE, recipe_as_trained

    old = dataclasses.asdict(dataclasses.replace(RECIPES["fast"], momentum=0.0, schedule="constant", warmup=0.3))
    as_trained = recipe_as_trained(old, {})  # both were ignored then: plain SGD, no warm-up
    assert (as_trained.nesterov, as_trained.warmup) == (False, 0.0)
    assert recipe_as_trained(old, {WARMUP_EVERY_SCHEDULE: True}).warmup == 0.3  # a new run's warm-up is its own
    onecycle = {**old, "schedule": "onecycle"}
    assert recipe_as_trained(onecycle, {}).warmup == 0.3  # onecycle always warmed up
    before_max_width = dataclasses.asdict(RECIPES["accurate"])
    del before_max_width["max_width"]  # accurate's checkpoints from before the cap trained all 256 channels
    assert "max_width" not in recipe_as_trained(before_max_width, {}).model_options()


def test_every_recipe_field_has_a_train_flag() -> None:
    from resnetlab.cli import build_parser
    from resnetlab.train.commands import RECIPE_FLAGS
    from resnetlab.train.recipes import Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    assert set(RECIPE_FLAGS) == fields
    assert fields <= set(vars(build_parser().parse_args(["train"])))  # the parser has a flag for each
    args = build_parser().parse_args(
        [
            "train",
            "--no-nesterov",
            "--warmup",
            "0.1",
            "--crop-padding",
            "3",
            "--normalize",
            "--init",
            "xavier",
            "--zero-init-residual",
            "--eval-batch-size",
            "7",
        ]
    )
    assert (
        args.nesterov,
        args.warmup,
        args.crop_padding,
        args.normalize,
        args.init,
        args.zero_init_residual,
        args.eval_batch_size,
    ) == (False, 0.1, 3, True, "xavier", True, 7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_accurate_trains_and_eval_reproduces_its_translated_tta(
    precision: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `accurate` rung's own settings (28 px, crops, a whitened stem, lookahead, translation TTA) end to end,
    on a subset."""
    from resnetlab.checkpoint import read_checkpoint
    from resnetlab.cli import main
    from resnetlab.train import train

    r = RECIPES["accurate"]
    fields = (r.resize, r.crop_padding, r.tta, r.tta_translate, r.width, r.max_width, r.whiten_stem, r.lookahead)
    assert fields == (0, 2, True, 1, 32, 128, True, True)
    # width 8 capped at 32 channels: the last stage capped as in the recipe, at a test's size
    result = train(
        "accurate",
        out=tmp_path / "run",
        precision=precision,
        width=8,
        max_width=32,
        subset=512,
        epochs=1,
        progress=False,
    )
    state, meta = read_checkpoint(result.checkpoint)
    assert meta["tta_translate"] == 1 and meta["train_precision"] == precision and meta["recipe"]["whiten_stem"]
    assert meta["recipe"]["lookahead"] and meta["model"]["options"]["max_width"] == 32
    assert state["model.layer4.0.conv1.weight"].shape[:2] == (32, 32)  # layer3 ends at 32, layer4 stays at 32
    capsys.readouterr()
    assert main(["eval", str(result.run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == result.test_acc
