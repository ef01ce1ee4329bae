"""The project's own error types.

Everything a user can get wrong (a bad argument, a corrupt file, a missing dataset) raises a
subclass of :class:`ResnetlabError`. The command line turns it into one line on stderr and exit
status 2; Python callers can catch it. Anything else reaching the top is a bug.
"""

from __future__ import annotations


class ResnetlabError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2
    # Raised by every torchrun worker with the same message (a signal reaches them all): only rank 0 prints it.
    said_by_rank_zero = False


class UsageError(ResnetlabError, ValueError):
    """A meaningless or out-of-range argument (also a ValueError, as torchvision raises)."""


class DataError(ResnetlabError):
    """A dataset file that is missing, corrupt or inconsistent."""


class CheckpointError(ResnetlabError):
    """A checkpoint or weights file that cannot be used."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): a library's
    multi-line error quoted inside resnetlab's one-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
