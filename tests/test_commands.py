"""The train command (train/commands.py, cli.py): the glibc heap bound, empty strings, --nproc and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import _train_refused
from resnetlab.cli import main
from resnetlab.errors import UsageError
from resnetlab.train import train

HEAP_PROBE = (
    r"""
import ctypes
from resnetlab.train.commands import bound_glibc_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
"""
    '                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", '
    '"fordblks", "keepcost")]\n'
    r"""
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], MallInfo2
applied = bound_glibc_heap()
libc.free(libc.malloc(9 << 20))  # by default this free raises glibc's mmap threshold above 9 MiB
block = libc.malloc(9 << 20)
print(applied, libc.mallinfo2().hblkhd >= 9 << 20)  # was the second 9 MiB block mmapped?
"""
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_train_command_keeps_large_activations_off_the_heap() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    probe = [sys.executable, "-c", HEAP_PROBE]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.split() == ["True", "True"]
    # A user's own setting wins, and without the bound the block comes from the heap.
    user = {**env, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert subprocess.run(probe, env=user, capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]


@pytest.mark.parametrize("flag", ["--out", "--resume", "--init-from", "--recipe", "--dataset"])
def test_an_empty_path_flag_is_refused(
    flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--out ''` trained into runs/RECIPE-TIMESTAMP, `--init-from ''` from scratch and `--recipe ''` fast, silently
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--subset", "64", "--epochs", "1", flag, ""])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"resnetlab train: error: argument {flag}: an empty string; give a value" in err
    if flag in ("--out", "--resume", "--init-from"):  # the Python API says it too
        with pytest.raises(UsageError, match=f"{flag} is empty; give a path, or leave {flag} out"):
            train(**{flag[2:].replace("-", "_"): "", "subset": 64, "epochs": 1})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", ""],
        ["export", "RUN", "--out", ""],
        ["predict", "--onnx", "", "a.png"],
        ["eval", "RUN", "--dataset", ""],
    ],
)
def test_empty_strings_are_refused_by_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # eval '' said "no checkpoint at last.safetensors"; export --out '' and eval --dataset '' used the defaults
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "an empty string; give a value" in err


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(nproc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_refused(
        tmp_path, capsys, "--nproc", nproc, "--subset", "64", "--epochs", "1"
    )  # 0 once ran one process
    assert f"--nproc must be >= 1, not {nproc}" in err


def test_a_torchrun_worker_never_launches_torchrun_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse takes `--npr 2` for --nproc 2, which the launcher did not strip from the workers'
    # command line: every worker would have started its own torchrun, without end.
    from resnetlab.train import commands, loop

    launched, trained = [], []
    monkeypatch.setattr(commands, "_launch_torchrun", lambda n: launched.append(n) or 0)
    monkeypatch.setattr(loop, "train", lambda *a, **k: trained.append(k["out"]))
    assert main(["train", "--npr", "2", "--out", "w"]) == 0 and launched == [2] and trained == []
    monkeypatch.setenv("RANK", "0")  # set by torchrun in every worker
    assert main(["train", "--npr", "2", "--out", "w"]) == 0 and launched == [2] and trained == ["w"]


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lr", "-1"], "lr must be > 0, not -1.0"),
        (["--out", "OUT", "--resume", "OUT"], "--resume continues the run in OUT; drop --out"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 training needs a GPU"),
        (["--init-from", "OUT/none.pth"], "no weights file at OUT/none.pth"),
    ],
)
def test_nproc_checks_the_flags_once_before_starting_any_worker(
    flags: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # every worker made the checks and printed the same error, then torchrun its own log lines
    from resnetlab.train import commands

    monkeypatch.setattr(commands, "_launch_torchrun", lambda n: pytest.fail("torchrun started"))
    flags = [f.replace("OUT", str(tmp_path)) for f in flags]
    assert main(["train", "--nproc", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.replace("OUT", str(tmp_path)) in err
