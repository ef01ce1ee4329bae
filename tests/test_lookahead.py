"""The lookahead of the weights (train/lookahead.py, --lookahead): its schedule, the run ending on the slow
copy, an exact resume, and a checkpoint without its slow copy refused."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TINY
from resnetlab.checkpoint import read_checkpoint
from resnetlab.cli import main
from resnetlab.fileio import CHECKPOINT_NAME
from resnetlab.train import loop as loop_module
from resnetlab.train import train
from resnetlab.train.lookahead import EVERY, Lookahead


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _shift(net: nn.Module, by: float) -> None:
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(by)


def test_the_slow_copy_keeps_more_as_the_run_ends_and_all_of_it_at_the_last_step() -> None:
    assert Lookahead.decay(0, 100) == 0.0  # no averaging while the learning rate is high
    assert Lookahead.decay(50, 100) == pytest.approx(0.95**5 / 8)
    assert Lookahead.decay(99, 100) < Lookahead.decay(100, 100) == 1.0


def test_every_fifth_step_the_net_moves_to_the_slow_copy_pulled_toward_it() -> None:
    net = _net()
    lookahead = Lookahead(net)
    start = {k: v.clone() for k, v in lookahead.slow.items()}
    _shift(net, 1.0)
    lookahead.after_step(net, EVERY - 1, 100)  # not due: nothing changes
    assert all(torch.equal(net.state_dict()[k], start[k] + 1.0) for k in start)
    lookahead.after_step(net, 5 * EVERY, 10 * EVERY)
    keep = Lookahead.decay(5 * EVERY, 10 * EVERY)
    for key, value in net.state_dict().items():
        if key in start:  # the slow copy moved by 1 - keep of the way, and the net took its value
            assert torch.allclose(value, start[key] + (1.0 - keep), atol=1e-6)
            assert torch.equal(value, lookahead.slow[key])
    assert net.state_dict()["1.num_batches_tracked"].dtype == torch.int64  # counters are not averaged
    assert "1.num_batches_tracked" not in lookahead.slow


def test_the_last_step_ends_on_the_slow_copy_even_between_two_updates() -> None:
    net = _net()
    lookahead = Lookahead(net)
    before = {k: v.clone() for k, v in lookahead.slow.items()}
    _shift(net, 1.0)
    lookahead.after_step(net, 7, 7)  # 7 steps in all: the last one is due, and keeps all of the slow copy
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 forced: slow on AVX2, tiny here
def test_a_run_with_lookahead_trains_and_checkpoints_its_slow_copy_as_its_weights(
    precision: str, tmp_path: Path
) -> None:
    result = train("fast", out=tmp_path / "run", **{**TINY, "precision": precision, "lookahead": True})
    tensors, meta = read_checkpoint(result.run_dir)
    assert meta["recipe"]["lookahead"] is True
    slow = {k.removeprefix("lookahead."): v for k, v in tensors.items() if k.startswith("lookahead.")}
    assert slow and all(torch.equal(v, tensors[f"model.{k}"]) for k, v in slow.items())
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]  # it learns
    assert result.test_acc == meta["history"][-1]["test_acc"]  # tested on the weights it checkpointed


def test_an_interrupted_run_with_lookahead_resumes_to_the_same_weights_and_slow_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**TINY, "lookahead": True}
    reference = train("fast", out=tmp_path / "reference", **settings).run_dir
    real, calls = loop_module.train_inputs, {"n": 0}

    def interrupted_at_step_12(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 12:  # epoch 2, step 4: the fast weights are 2 steps past the last update
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(loop_module, "train_inputs", interrupted_at_step_12)
    out = tmp_path / "interrupted"
    with pytest.raises(loop_module.TrainingInterrupted):
        train("fast", out=out, **settings)
    stopped = read_checkpoint(out)[0]
    slow = [k.removeprefix("lookahead.") for k in stopped if k.startswith("lookahead.")]
    assert any(not torch.equal(stopped[f"lookahead.{k}"], stopped[f"model.{k}"]) for k in slow)  # saved apart
    monkeypatch.setattr(loop_module, "train_inputs", real)
    train(resume=out, progress=False)
    a, b = read_checkpoint(reference)[0], read_checkpoint(out)[0]
    kept = [k for k in a if k.startswith(("model.", "lookahead."))]
    assert set(kept) <= set(b) and all(torch.equal(a[k], b[k]) for k in kept)


def test_a_checkpoint_without_its_slow_copy_is_refused_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    run_dir = train("fast", out=tmp_path / "run", **{**TINY, "epochs": 1, "lookahead": True}).run_dir
    path = run_dir / CHECKPOINT_NAME
    _, meta = read_checkpoint(run_dir)
    meta["recipe"]["epochs"] = 2  # a run with an epoch left to resume
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("lookahead.")}
    save_file(tensors, str(path), metadata={"resnetlab": json.dumps(meta)})
    assert main(["train", "--resume", str(run_dir)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lookahead." in err and str(run_dir) in err
