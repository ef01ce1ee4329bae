"""The run directory: config.json, metrics.jsonl/.csv, curves.png, confusion.png.

Metrics are rewritten from the checkpoint's history after every epoch, so a run that was killed
and resumed never shows a duplicated or missing epoch.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from resnetlab.checkpoint import atomic_write_bytes
from resnetlab.errors import UsageError
from resnetlab.fileio import CHECKPOINT_NAME, EXPORT_NAME, PREVIOUS_RUN

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_acc",
    "images_per_s",
    "compute_images_per_s",
    "seconds",
    "lr",
]
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "config.json")
REPLACED_FILES = (*RUN_FILES, EXPORT_NAME)  # what --force replaces: the run's files and its exported model
LOCK_NAME = (
    ".lock"  # held by the live run (see RunLock); not a file of the run: checks, --force and cleanup pass over it
)

try:
    import fcntl
except ImportError:  # Windows: no flock, so no lock (a run directory is then guarded by the checks alone)
    fcntl = None  # type: ignore[assignment]


def _unusable(run_dir: Path, doing: str, err: OSError) -> UsageError:
    return UsageError(f"cannot {doing} run directory {run_dir}: {err.strerror or err}; choose another --out")


def prepare_run_dir(out: str | Path | None, recipe_name: str, force: bool) -> Path:
    """Choose the run directory (``--out``, else runs/RECIPE-TIMESTAMP) and check it may be used.

    Nothing is written or removed yet.

    A default name is not checked here: :meth:`RunFiles.create` claims it, or ``NAME-2``, ``NAME-3``...
    when another run (started in the same second) has it.
    """
    if not out:
        return Path("runs") / f"{recipe_name}-{datetime.now():%Y%m%d-%H%M%S}"
    # normpath: `missing/../RUN` names RUN, but Path("missing/../RUN").is_dir() is False, which let an
    # existing run through this check and have its files removed as an old run's.
    run_dir = Path(os.path.normpath(out))
    check_not_in_use(run_dir)  # early, before the data loads; RunFiles.create() takes the lock and checks again
    check_run_dir(run_dir, force)
    return run_dir


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse ``run_dir`` for a new run if it is a file, a user's folder, or a run and not ``force``.

    Args:
        run_dir: the ``--out`` directory (it may not exist).
        force: the old run in it may be replaced.
    """
    try:
        exists, is_dir = run_dir.exists(), run_dir.is_dir()
        has_files = is_dir and any(p.name != LOCK_NAME for p in run_dir.iterdir())  # a stale lock alone is no run
        is_run = has_files and _holds_a_run(run_dir)
        ours = has_files and [n for n in RUN_FILES if os.path.lexists(run_dir / n)]
    except OSError as err:  # e.g. a name too long for the file system: pathlib raises instead of answering False
        raise _unusable(run_dir, "create", err) from None
    if exists and not is_dir:
        raise UsageError(f"--out {run_dir} exists and is not a directory; choose another --out")
    if has_files and not is_run:  # a user's folder (as root, even /): --force replaces a run, never a user's files
        why = (
            f"{', '.join(ours)} but no resnetlab run, and resnetlab does not overwrite files it did not write;"
            if ours
            else "files but no resnetlab run; a run needs a new or empty folder:"
        )
        raise UsageError(f"--out {run_dir} holds {why} choose another --out")
    if has_files and not force:
        if not (run_dir / CHECKPOINT_NAME).is_file():  # e.g. a run killed (SIGKILL, power) before its first checkpoint
            aside = (
                f" (the run it was replacing is in {run_dir / PREVIOUS_RUN})"
                if (run_dir / PREVIOUS_RUN).is_dir()
                else ""
            )
            raise UsageError(
                f"run directory {run_dir} already exists and holds no checkpoint to resume{aside}; "
                "use --force to overwrite it, or another --out"
            )
        raise UsageError(
            f"run directory {run_dir} already exists; use --resume {run_dir} to continue it, "
            "--force to overwrite it, or another --out"
        )


def checkpoint_stamp(run_dir: Path) -> tuple[int, int, int] | None:
    """Identity of ``run_dir``'s checkpoint (a rewrite renames a new file over it), or None if it has none."""
    try:
        st = (run_dir / CHECKPOINT_NAME).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RunLock:
    """The lock a live run holds on its directory: ``flock`` on ``RUN/.lock``, which holds its PID.

    Why flock: the OS releases it when the process dies, even by SIGKILL or a power loss, so a
    lock is never stale (a ``.lock`` file a killed run leaves is ignored). Checking that a
    directory is free and then creating it left a gap in which two runs both passed; a run takes
    this lock first and only then decides what to do with the directory's contents.

    A run that ends removes the file while it still holds it, then releases it; a run that opened
    the file just before then locks a removed file, so :meth:`acquire` checks that the path still
    names the file it locked.

    Args:
        run_dir: the run directory (it must exist).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file: Any = None
        self._removed = False

    def acquire(self) -> None:
        """Take the lock and write this process's PID into it.

        Raises:
            UsageError: a live run holds it.
            OSError: the lock file cannot be created.
        """
        if fcntl is None:
            return
        for _ in range(100):  # a retry only when the holder removed the file as it was opened
            f = open(self.path, "a+")  # held for the life of the run
            try:
                _flock_exclusive(f)
            except BlockingIOError:
                raise _in_use(self.path.parent, f) from None
            except BaseException:
                f.close()
                raise
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
                self._file = f
                return
            f.close()
        raise UsageError(
            f"cannot lock run directory {self.path.parent}: its lock file keeps being replaced; choose another --out"
        )

    def remove_file(self) -> None:
        """Remove the lock file (once, and only while holding it: a file created later is another run's)."""
        if self._file is not None and not self._removed:
            self._removed = True
            with contextlib.suppress(OSError):
                self.path.unlink()

    def release(self) -> None:
        """Remove the lock file, then unlock (closing it unlocks)."""
        if self._file is not None:
            self.remove_file()
            self._file.close()
            self._file = None


def _flock_exclusive(f: Any, probe_seconds: float = 0.2) -> None:
    """``flock(LOCK_EX)`` without waiting for a live run; a moment's wait for :func:`check_not_in_use`'s probe,
    which holds a shared lock for an instant (refused then, a stale file would name a dead run's PID)."""
    deadline = time.monotonic() + probe_seconds
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def check_not_in_use(run_dir: Path) -> None:
    """Refuse ``run_dir`` at once if a live run holds it (an early check: only :meth:`RunLock.acquire` decides).

    Only rank 0 and the ``--nproc`` launcher call it: the probe holds the lock for an instant.

    Args:
        run_dir: a run directory, which may not exist (then no run holds it).

    Raises:
        UsageError: a live run holds ``run_dir``; the message names its PID.
    """
    if fcntl is None:
        return
    try:
        f = open(run_dir / LOCK_NAME, "rb")  # no lock file, no run: nothing is created here
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: works on a read-only file, even over NFS
        except BlockingIOError:
            raise _in_use(run_dir, f) from None


def _in_use(run_dir: Path, lock_file: Any) -> UsageError:
    """The refusal naming the PID in the held ``lock_file`` (which it closes).

    The holder writes the PID just after locking.
    """
    with lock_file:
        for _ in range(20):
            lock_file.seek(0)
            pid = lock_file.read().strip()
            pid = pid.decode(errors="replace") if isinstance(pid, bytes) else pid
            if pid:
                break
            time.sleep(0.05)
    who = f"PID {pid}" if pid else "its PID is not written yet"
    return UsageError(
        f"run directory {run_dir} is in use by a live run ({who}); wait for it to finish or stop it, "
        "or choose another --out"
    )


def _holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a resnetlab run: a checkpoint, the config.json a run writes first, or
    the run a --force run set aside."""
    if (run_dir / CHECKPOINT_NAME).is_file() or (run_dir / PREVIOUS_RUN).is_dir():
        return True
    try:
        config = json.loads((run_dir / "config.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("recipe"), dict) and "resnetlab" in config


class RunFiles:
    """The run directory, on rank 0: created once the run has passed its checks, discarded if the
    run fails before its first checkpoint.

    Why discard: a run that fails before its first checkpoint has nothing to resume, yet its
    config.json alone made the directory "already exist", so it could be neither resumed nor reused
    without --force. As a context manager, a failure before the first checkpoint therefore removes
    the files this run wrote and the directories :meth:`create` made (a directory that existed
    stays, without the run's files). A run that has checkpointed keeps everything, for ``--resume``.

    --force: the old run's files (and its model.onnx) wait in ``.previous-run/`` until the new
    run's first checkpoint, then go; a new run that fails before it puts them back. A run killed in
    between cannot clean up: the old run stays in ``.previous-run/`` (the "already exists" and
    --resume errors name it), torchelastic's restart starts over from the config.json
    (``dist.restarted_run``), and a user reuses the directory with --force, which keeps that old run
    aside. A ``.previous-run/`` beside a checkpoint, or empty, is stale (its replacement
    checkpointed): --force and --resume remove it.

    The live run holds the directory's :class:`RunLock` from :meth:`create` to :meth:`release`
    (the end of the run), or to a failure.

    Args:
        run_dir: the directory, from :func:`prepare_run_dir`.
        new: a new run (not a resumed one).
        unique: ``run_dir`` is a default name: take ``NAME-2``, ``NAME-3``... if it exists.
        force: ``--force`` (checked again under the lock).
        resumed_stamp: a resumed run: :func:`checkpoint_stamp` of the checkpoint before it was read.
    """

    def __init__(
        self,
        run_dir: Path,
        new: bool,
        unique: bool = False,
        force: bool = False,
        resumed_stamp: tuple[int, int, int] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.new = new
        self.unique = unique
        self.force = force
        self.resumed_stamp = resumed_stamp
        self.checkpointed = not new  # a resumed run has its checkpoint
        self._made: list[Path] | None = None  # what create() made, innermost first; None before create()
        self._aside: Path | None = None  # where the run that --force replaces waits
        self._lock: RunLock | None = None

    def create(self) -> Path:
        """Make (or claim) the directory, lock it, check again what it holds, and set an old run's files
        aside (--force), now that the run has passed its checks."""
        try:
            missing = [d for d in self.run_dir.parents if not d.exists()]
            if self.unique:
                self.run_dir.parent.mkdir(parents=True, exist_ok=True)
                self.run_dir = _claim(self.run_dir)
                missing.insert(0, self.run_dir)
            else:
                if not self.run_dir.exists():
                    missing.insert(0, self.run_dir)
                self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(self.run_dir)
            lock.acquire()  # before this run's first file: of two runs that passed the checks together, one stops here
        except OSError as err:
            raise _unusable(self.run_dir, "create", err) from None
        try:
            # again, under the lock: another run may have written here since prepare_run_dir looked
            if self.new and not self.unique:
                check_run_dir(self.run_dir, self.force)
            elif self.resumed_stamp is not None and checkpoint_stamp(self.run_dir) != self.resumed_stamp:
                raise UsageError(
                    f"run directory {self.run_dir} was written by another run while this one started; "
                    f"resume it again: resnetlab train --resume {self.run_dir}"
                )
            if self.new:
                try:
                    self._set_aside_old_run()
                except OSError as err:
                    raise _unusable(self.run_dir, "overwrite", err) from None
            elif (
                self.run_dir / PREVIOUS_RUN
            ).is_dir():  # stale: the resumed run checkpointed after it replaced that run
                self._aside = self.run_dir / PREVIOUS_RUN
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self._made = missing  # only now: a failed create() leaves any old run's files to the user
        return self.run_dir

    def release(self) -> None:
        """The run is over (its last file written): remove the lock file and release the lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _set_aside_old_run(self) -> None:
        aside = self.run_dir / PREVIOUS_RUN
        if aside.is_dir() and ((self.run_dir / CHECKPOINT_NAME).exists() or not any(aside.iterdir())):
            # stale: the run that replaced it checkpointed (and was killed before removing it), or it
            # was emptied by hand; the run to replace now is the one in run_dir
            shutil.rmtree(aside)
        if aside.is_dir():  # a --force run was killed before its first checkpoint: the run it replaced stays aside
            self._remove_run_files()
        else:
            old = [self.run_dir / n for n in REPLACED_FILES if os.path.lexists(self.run_dir / n)]
            if not old:
                return
            aside.mkdir()
            with _signals_blocked():  # a second Ctrl-C must not split the old run between two folders
                for path in old:
                    path.rename(aside / path.name)
        self._aside = aside

    @property
    def replacing(self) -> bool:
        """Whether an old run waits aside for this run's first checkpoint (--force)."""
        return self._aside is not None and self.new

    def mark_checkpointed(self) -> None:
        """The run has its first checkpoint: it no longer needs the run it replaces."""
        self.checkpointed = True
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def _remove_run_files(self) -> None:
        for name in REPLACED_FILES:
            (self.run_dir / name).unlink(missing_ok=True)

    def __enter__(self) -> "RunFiles":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:  # the run goes on to write its last files; train() calls release() after them
            return
        try:
            if self.checkpointed or self._made is None:
                return
            # Best effort: the run's own error is what the user must see. rmdir stops at a directory
            # that is not empty (something else was put there meanwhile), and keeps it.
            # A second Ctrl-C waits until the old run is back (it would leave it in .previous-run).
            with contextlib.suppress(OSError), _signals_blocked():
                self._remove_run_files()
                if self._aside is not None:
                    for path in self._aside.iterdir():
                        path.rename(self.run_dir / path.name)
                    self._aside.rmdir()
                if self._lock is not None:
                    self._lock.remove_file()  # still held: no other run is in the directory while it goes
                for d in self._made:
                    d.rmdir()
        finally:
            self.release()  # last


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM (delivered on exit) while a few renames must all happen."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _claim(base: Path) -> Path:
    """Make ``base``, or the first free ``base-2``, ``base-3``...: mkdir is atomic, so two runs never share one."""
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "999 runs of this name exist", str(base))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def metric_rows(curve: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row of a run in order: each epoch's curve rows (``kind`` ``"step"``), then its own row (``"epoch"``)."""
    rows: list[dict[str, Any]] = []
    for epoch_row in history:
        rows.extend(r for r in curve if r["epoch"] == epoch_row["epoch"])
        rows.append(epoch_row)
    rows.extend(r for r in curve if r["epoch"] > len(history))  # the epoch under way
    return rows


def write_metrics(run_dir: Path, curve: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """metrics.jsonl: every row, the curve's and the epochs'; metrics.csv: one row per finished epoch."""
    rows = metric_rows(curve, history)
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(run_dir / "metrics.csv", buf.getvalue().encode())


def _figure_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves_png(curve: list[dict[str, Any]], history: list[dict[str, Any]], title: str) -> bytes:
    """The chapter's figure as PNG bytes: training loss and accuracy against epochs (the curve's rows, at least
    10 per epoch), test accuracy at the epoch ends that were tested.

    An epoch without curve rows (a run from before they existed) is drawn from its epoch row.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display is needed, even on a desktop
    import matplotlib.pyplot as plt

    points = []  # (epochs done, train loss, train acc)
    epochs_with_rows = {r["epoch"] for r in curve}
    for row in metric_rows(curve, history):
        if row.get("kind", "epoch") == "step":
            points.append((row["epoch"] - 1 + row["epoch_fraction"], row["train_loss"], row["train_acc"]))
        elif row["epoch"] not in epochs_with_rows:
            points.append((row["epoch"], row["train_loss"], row["train_acc"]))
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], "-", label="train loss")
    ax.plot([p[0] for p in points], [p[2] for p in points], "m--", label="train acc")
    tested = [r for r in history if r["test_acc"] is not None]  # --eval-every skips some epochs
    ax.plot(
        [r["epoch"] for r in tested],
        [r["test_acc"] for r in tested],
        "g-.",
        marker="o" if len(tested) < 2 else None,
        label="test acc",
    )
    ax.set_xlabel("epoch")
    last = max([p[0] for p in points] + [r["epoch"] for r in history] + [1])
    ax.set_xlim(0 if curve else 0.5 if len(history) < 2 else 1, max(last, 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    png = _figure_bytes(fig)
    plt.close(fig)
    return png


def plot_curves(path: Path, curve: list[dict[str, Any]], history: list[dict[str, Any]], title: str) -> None:
    """Write :func:`curves_png` to ``path`` (curves.png)."""
    atomic_write_bytes(path, curves_png(curve, history, title))


def plot_confusion(path: Path, confusion: torch.Tensor, classes: list[str], title: str) -> None:
    """The test-set confusion matrix (rows: true class, columns: predicted) with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = confusion.max().item() or 1
        for i in range(k):
            for j in range(k):
                v = int(confusion[i, j])
                ax.text(j, i, v, ha="center", va="center", fontsize=6, color="white" if v > top / 2 else "black")
    ax.set_title(title, fontsize=9)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)
