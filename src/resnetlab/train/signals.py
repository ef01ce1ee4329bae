"""Ctrl-C and SIGTERM become a flag the loop checks between steps, to checkpoint and stop there."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from resnetlab.errors import ResnetlabError

__all__ = ["TrainingInterrupted", "stop_flag", "stopped"]


class TrainingInterrupted(ResnetlabError):
    """Ctrl-C (exit status 130) or SIGTERM (143): the checkpoint was saved; the run can be resumed."""

    exit_code = 130
    said_by_rank_zero = True

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def stop_flag(sigterm: bool) -> Iterator[dict[str, Any]]:
    """Turn the first Ctrl-C (and SIGTERM when ``sigterm``) into a flag the loop checks between
    steps, to checkpoint and stop there; a second signal aborts at once.

    SIGTERM is what ``timeout``, ``kill`` and job schedulers (Slurm, Kubernetes) send before they
    kill. Not under torchrun: torchelastic stops the other workers with SIGTERM when one fails and
    restarts them from the last checkpoint, and a checkpoint then would wait on the failed worker.
    """
    state: dict[str, Any] = {"interrupted": False, "signal": None}
    if not _in_main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["interrupted"]:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        state["interrupted"], state["signal"] = True, signum

    signals = [signal.SIGINT, signal.SIGTERM] if sigterm else [signal.SIGINT]
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stopped(stop: dict[str, Any]) -> str:
    return "interrupted" if stop["signal"] == signal.SIGINT else "terminated (SIGTERM)"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
