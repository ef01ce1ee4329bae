"""Reader for the *binary* version of CIFAR-10 (never the pickled Python version).

Each batch file is a sequence of 3073-byte records: one label byte, then 3072 pixel bytes
(1024 red, 1024 green, 1024 blue, each 32x32 row-major), so a record is already C x H x W.
The batches are read straight from ``cifar-10-binary.tar.gz`` (no extraction to disk) or from the
extracted ``cifar-10-batches-bin`` folder. Each batch is read into one buffer and copied once
into the preallocated N x 3 x 32 x 32 result.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from resnetlab.data.sources import CIFAR10_CLASSES, CIFAR_TEST, CIFAR_TRAIN
from resnetlab.errors import DataError

RECORD = 1 + 3 * 32 * 32
NUM_CLASSES = 10


def read_cifar_archive(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """(train images, labels), (test images, labels), class names from the ``.tar.gz``."""
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {}
            meta = None
            for m in tf.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile():
                    continue
                if base in CIFAR_TRAIN + CIFAR_TEST and base not in members:
                    members[base] = m
                elif base == "batches.meta.txt" and meta is None:
                    meta = m
            missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if n not in members]
            if missing:
                raise DataError(f"{path}: not a CIFAR-10 binary archive: missing {', '.join(missing)}")
            sizes = {n: m.size for n, m in members.items()}

            def opener(name: str) -> BinaryIO:
                f = tf.extractfile(members[name])
                assert f is not None
                return f

            # read members in archive order so the gzip stream is decompressed forwards only
            order = sorted(members, key=lambda n: members[n].offset_data)
            train, test = _read_batches(f"{path}:", sizes, opener, order)
            classes = _classes(_read_meta(tf, meta))
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: corrupt or truncated archive ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    return train, test, classes


def read_cifar_folder(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """The same from an extracted ``cifar-10-batches-bin`` folder."""
    sizes = {}
    for n in CIFAR_TRAIN + CIFAR_TEST:
        try:
            sizes[n] = (folder / n).stat().st_size
        except OSError as err:
            raise DataError(f"{folder / n}: cannot read ({err.strerror or err})") from None
    train, test = _read_batches(f"{folder}/", sizes, lambda n: open(folder / n, "rb"), list(CIFAR_TRAIN + CIFAR_TEST))
    meta_path = folder / "batches.meta.txt"
    meta = None
    if meta_path.is_file():
        try:
            meta = meta_path.read_bytes()
        except OSError:
            meta = None
    return train, test, _classes(meta)


def _read_batches(
    prefix: str, sizes: dict[str, int], opener: Callable[[str], BinaryIO], order: list[str]
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    counts = {}
    for n, size in sizes.items():
        if size == 0:
            raise DataError(f"{prefix}{n}: empty file")
        if size % RECORD:
            raise DataError(
                f"{prefix}{n}: truncated or not a CIFAR-10 batch: {size} bytes is not a whole number of "
                f"{RECORD}-byte records"
            )
        counts[n] = size // RECORD
    out = {}
    for group in (CIFAR_TRAIN, CIFAR_TEST):
        total = sum(counts[n] for n in group)
        out[group] = (np.empty((total, 3, 32, 32), dtype=np.uint8), np.empty(total, dtype=np.uint8))
    offsets = {}
    for group in (CIFAR_TRAIN, CIFAR_TEST):
        at = 0
        for n in group:
            offsets[n] = (group, at)
            at += counts[n]
    for n in order:
        group, at = offsets[n]
        images, labels = out[group]
        buf = bytearray(sizes[n])
        with opener(n) as f:
            view, got = memoryview(buf), 0
            while got < len(buf):
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
        if got < len(buf):
            raise DataError(f"{prefix}{n}: truncated: {got} of {len(buf)} bytes")
        records = np.frombuffer(buf, dtype=np.uint8).reshape(counts[n], RECORD)
        lab = records[:, 0]
        if lab.size and int(lab.max()) >= NUM_CLASSES:
            bad = int(np.argmax(lab >= NUM_CLASSES))
            raise DataError(f"{prefix}{n}: label {int(lab[bad])} of record {bad} is out of range 0..{NUM_CLASSES - 1}")
        labels[at : at + counts[n]] = lab
        images[at : at + counts[n]] = records[:, 1:].reshape(-1, 3, 32, 32)
        del records, lab, buf
    return out[CIFAR_TRAIN], out[CIFAR_TEST]


def _read_meta(tf: tarfile.TarFile, member: tarfile.TarInfo | None) -> bytes | None:
    if member is None:
        return None
    f = tf.extractfile(member)
    return f.read(4096) if f is not None else None


def _classes(meta: bytes | None) -> list[str]:
    """Class names from ``batches.meta.txt`` when it lists exactly ten, else the known list."""
    if meta:
        names = [line.strip() for line in meta.decode("utf-8", "replace").splitlines() if line.strip()]
        if len(names) == NUM_CLASSES:
            return names
    return list(CIFAR10_CLASSES)
