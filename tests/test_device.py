"""Devices (device.py): the ones resnetlab cannot use are refused by train and eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import _train_refused
from resnetlab.cli import main


@pytest.mark.parametrize("device", ["meta", "xpu", "lazy", "cuda:x"])
def test_devices_resnetlab_cannot_use_are_refused(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch knows meta, xpu and lazy, but training and eval need cpu, cuda or mps
    err = _train_refused(tmp_path, capsys, "--device", device, "--subset", "64")
    assert f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps" in err
    assert (
        main(["eval", str(tmp_path / "no-such-run"), "--device", device]) == 2
    )  # refused before the checkpoint is read
    assert f"unknown device {device!r}" in capsys.readouterr().err
