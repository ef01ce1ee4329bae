"""Reader for the IDX format of MNIST and Fashion-MNIST, gzip-compressed or raw.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
then one big-endian uint32 per dimension, then the values in C order. Only unsigned bytes
(type 0x08) occur in (Fashion-)MNIST, and only those are accepted.

Reading is memory-frugal: the header is read first, then the payload is decompressed
straight into one ``bytearray`` of exactly the announced size (``readinto``), which numpy and
torch then share without copying. Every way a file can be wrong raises :class:`DataError` with
one line naming the file; nothing else escapes (the reader is fuzzed with hypothesis).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from resnetlab.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
_TYPE_NAMES = {0x08: "ubyte", 0x09: "byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
# Deflate cannot compress better than about 1032:1; a header that claims more payload than that
# from the compressed size is a lie, rejected before any allocation.
_MAX_DEFLATE_RATIO = 1032
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw, told apart by the gzip magic, not the name).

    Returns a read-only-safe, writable uint8 array of the header's shape that owns a single
    buffer. ``ndim`` (when given) is the number of dimensions the caller expects
    (3 for images, 1 for labels); any other count is a wrong magic number.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror or err})") from None
    with f:
        if size == 0:
            raise DataError(f"{path}: empty file")
        head = f.read(2)
        f.seek(0)
        if head == GZIP_MAGIC:
            limit = size * _MAX_DEFLATE_RATIO + 4096
            try:
                with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    return read_idx_stream(gz, str(path), ndim=ndim, max_payload=limit, exact=False)
            except DataError:
                raise
            except _DECOMPRESS_ERRORS as err:
                raise DataError(f"{path}: corrupt or truncated gzip data ({_describe(err)})") from None
        return read_idx_stream(f, str(path), ndim=ndim, max_payload=size, exact=True)


def parse_idx(data: bytes, source: str = "<bytes>", ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes held in memory (gzip-compressed or raw), with :func:`read_idx`'s checks."""
    if len(data) == 0:
        raise DataError(f"{source}: empty file")
    if data[:2] == GZIP_MAGIC:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
                limit = len(data) * _MAX_DEFLATE_RATIO + 4096
                return read_idx_stream(gz, source, ndim=ndim, max_payload=limit, exact=False)
        except DataError:
            raise
        except _DECOMPRESS_ERRORS as err:
            raise DataError(f"{source}: corrupt or truncated gzip data ({_describe(err)})") from None
    return read_idx_stream(io.BytesIO(data), source, ndim=ndim, max_payload=len(data), exact=True)


def read_idx_stream(f: BinaryIO, source: str, *, ndim: int | None = None, max_payload: int, exact: bool) -> np.ndarray:
    """Read an IDX header and payload from a (possibly decompressing) stream.

    ``max_payload`` bounds what the header may claim (the file size for raw files, a deflate bound
    for gzip) so a forged header cannot make us allocate terabytes. The stream must end exactly
    after the payload (``exact`` only changes the wording: for raw files the bound is the size).
    """
    magic = _read_exact(f, 4)
    if len(magic) == 0:
        raise DataError(f"{source}: empty file")
    if len(magic) < 4:
        raise DataError(f"{source}: truncated: {len(magic)} bytes, shorter than the 4-byte IDX magic number")
    expect = f" (expected 0x{UBYTE << 8 | ndim:08x})" if ndim is not None else ""
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _TYPE_NAMES or magic[3] == 0:
        raise DataError(f"{source}: wrong magic number 0x{magic.hex()}{expect}: not an IDX file")
    if magic[2] != UBYTE:
        raise DataError(
            f"{source}: wrong magic number 0x{magic.hex()}{expect}: "
            f"IDX type {_TYPE_NAMES[magic[2]]}, only ubyte (0x08) is supported"
        )
    if ndim is not None and magic[3] != ndim:
        raise DataError(f"{source}: wrong magic number 0x{magic.hex()}{expect}: {magic[3]} dimensions, expected {ndim}")
    nd = magic[3]
    raw_dims = _read_exact(f, 4 * nd)
    if len(raw_dims) < 4 * nd:
        raise DataError(f"{source}: truncated header: {4 + len(raw_dims)} bytes, the header needs {4 + 4 * nd}")
    dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(nd)]
    count = 1
    for d in dims:
        count *= d
    header = 4 + 4 * nd
    available = max_payload - header
    if count > available:
        if exact:
            raise DataError(
                f"{source}: truncated or header counts disagree with the payload: header {'x'.join(map(str, dims))} "
                f"needs {count} bytes after the header, the file has {max(available, 0)}"
            )
        raise DataError(
            f"{source}: header counts disagree with the payload: "
            f"header {'x'.join(map(str, dims))} claims {count} bytes, "
            f"more than the compressed file can hold"
        )
    buf = bytearray(count)
    got = _readinto_exact(f, buf)
    if got < count:
        raise DataError(
            f"{source}: truncated or header counts disagree with the payload: header {'x'.join(map(str, dims))} "
            f"needs {count} bytes after the header, only {got} present"
        )
    extra = f.read(1)  # also makes gzip check its CRC and length trailer
    if extra:
        more = f"{max_payload - header - count} more" if exact else "more bytes"
        raise DataError(
            f"{source}: header counts disagree with the payload: header {'x'.join(map(str, dims))} "
            f"accounts for {count} bytes after the header, {more} follow"
        )
    try:
        return np.frombuffer(buf, dtype=np.uint8).reshape(dims)
    except ValueError:  # a zero dimension makes the count 0 whatever the others are, and numpy refuses huge ones
        raise DataError(f"{source}: header {'x'.join(map(str, dims))} is not an array shape numpy can hold") from None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _readinto_exact(f: BinaryIO, buf: bytearray) -> int:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0] if text else type(err).__name__
