"""Live curves in a notebook: a real IPython kernel runs ``resnetlab.train(...)`` and its cell's output ends
holding the last curves, updated in place (one image, not one per row); outside a kernel nothing is drawn."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from helpers import TINY
from resnetlab.train.live import in_notebook, live_curves

nbformat = pytest.importorskip("nbformat", reason="pip install 'resnetlab[notebook]' (make test installs it)")
nbclient = pytest.importorskip("nbclient", reason="pip install 'resnetlab[notebook]' (make test installs it)")


def test_outside_a_kernel_nothing_is_drawn() -> None:
    assert not in_notebook() and live_curves("a run", is_main=True) is None


def test_a_notebook_shows_the_curves_live_and_ends_with_the_run_s_figure(tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = {**TINY, "subset": 320, "batch_size": 16}  # 20 steps per epoch: 10 rows each
    code = (
        "import os\nos.environ['OMP_NUM_THREADS'] = '1'\n"
        "from resnetlab.train import train\n"
        f"result = train('fast', out={str(out)!r}, **{settings!r})\n"
        "print(result.test_acc)"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    updates: list[str] = []

    class RecordingClient(nbclient.NotebookClient):  # the kernel's display messages, as a front end gets them
        def process_message(self, msg, cell, cell_index):  # type: ignore[no-untyped-def]
            if msg["msg_type"] in ("display_data", "update_display_data"):
                updates.append(msg["msg_type"])
            return super().process_message(msg, cell, cell_index)

    RecordingClient(notebook, timeout=300, kernel_name="python3").execute(cwd=str(tmp_path))
    outputs = notebook.cells[0].outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # updated in place
    assert updates[0] == "display_data" and updates.count("update_display_data") >= 20  # every row of 2 epochs
    shown = base64.b64decode(images[0]["data"]["image/png"])
    assert shown == (out / "curves.png").read_bytes()  # the last update: the finished run's figure
