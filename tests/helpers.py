"""Helpers shared by the training tests (test_loop.py, test_request.py, test_rundir.py, ...): the tiny recipe, copies of
a run, refusals, image folders.

Plain constants and functions, imported explicitly; the shared ``tiny_run`` fixture is in conftest.py.
(Named without test_ so that pytest does not collect it.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnetlab.cli import main

# eval_every=1: fast tests after its last epoch only, and these tests compare every epoch's test accuracy.
# fp32 forced: no test assumes what `auto` picks here; tests/test_precision.py covers bf16 too.
TINY = dict(
    model="resnet10", width=8, subset=512, batch_size=64, epochs=2, eval_every=1, precision="fp32", progress=False
)
TINY_FLAGS = [
    "--model",
    "resnet10",
    "--width",
    "8",
    "--subset",
    "512",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--eval-every",
    "1",
    "--precision",
    "fp32",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _copy_run(run_dir: Path, dest: Path) -> dict[str, bytes]:
    import shutil

    shutil.copytree(run_dir, dest)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def _train_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """`resnetlab train FLAGS --out RUN`: exit 2, one line on stderr, no run directory; the line."""
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    return err


def _image_folder(root: Path, per_class: int, shape: tuple[int, int] = (8, 8)) -> Path:
    """A tiny folder dataset: classes a and b, ``per_class`` grey PNGs of ``shape`` (8x8) each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root
