"""File helpers shared by checkpoints, downloads, exports and weight loading."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from resnetlab.errors import CheckpointError

# The files of a run directory that layers below training also name (pretrained weights from a run,
# torchelastic's restart, the run directory, export and the ONNX runtime).
CHECKPOINT_NAME = "last.safetensors"
EXPORT_NAME = "model.onnx"
PREVIOUS_RUN = ".previous-run"  # where the run that --force replaces waits for the new run's first checkpoint


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_torch_save(head: bytes) -> bool:
    """Whether a file starting with ``head`` (>= 9 bytes) is a torch.save zip or a pickle, not safetensors.

    A safetensors file starts with its header's length (8 bytes, little-endian) and then the JSON
    header's ``{``. The length's first byte can be 0x80, a pickle's first byte (1 file in 32: the
    length is a multiple of 8), so the ``{`` decides, and a pickle needs its protocol byte (2-5) too.
    """
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def umask_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode ``open()`` would have: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_head(path: Path, other: str) -> bytes:
    """The first 16 bytes of a checkpoint or weights file (enough for :func:`is_torch_save`).

    A read that fails (EIO: a bad disk) is a CheckpointError suggesting ``other`` ("another
    checkpoint"); a permission error stays an OSError, for which the CLI names the fix.
    """
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            raise
        raise CheckpointError(
            f"{path} cannot be read ({err.strerror or err}); check the disk, or use {other}"
        ) from None
