"""One training step (train/step.py): the lr schedule, the step clock, seeds and generators."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from resnetlab.train import RECIPES
from resnetlab.train import loop as loop_module


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


def test_step_clock_sums_only_the_bracketed_time_and_resets() -> None:
    from resnetlab.train.step import StepClock

    clock = StepClock(torch.device("cpu"))
    for _ in range(2):
        clock.start()
        time.sleep(0.02)
        clock.stop()
        time.sleep(0.05)  # between steps: not counted
    first = clock.take()
    assert 0.04 <= first < 0.09
    assert clock.take() == 0.0


def test_every_valid_seed_gives_valid_generators() -> None:
    from resnetlab.data import BatchLoader, Split
    from resnetlab.train.recipes import MAX_SEED, MIN_SEED, Recipe

    Recipe(seed=MAX_SEED).validate()
    Recipe(seed=MIN_SEED).validate()
    # Seeds from about 20,000 up once overflowed torch's seed range in the augmentation's derivation.
    split = Split(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64), ["a"])
    for seed in (20_000, 50_000, -1, MIN_SEED, MAX_SEED):
        loop_module.augment_generator(seed, 10_000, 100_000, 1_023).initial_seed()
        assert (
            len(list(BatchLoader(split, 2, shuffle=True, seed=seed).batches(10_000))) == 3
        )  # the shuffle's own derivation
        torch.Generator().manual_seed(seed)  # the initialisation's and the subset's
    # Seeds that always worked keep their exact generators (resumed runs and published figures depend on them).
    for seed, epoch, step, rank in [(0, 0, 0, 0), (3, 2, 117, 1), (9_000, 59, 468, 7), (18_000, 59, 1_000, 1)]:
        old = ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank
        assert loop_module.augment_generator(seed, epoch, step, rank).initial_seed() == old
