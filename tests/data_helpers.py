"""Helpers shared by the data tests: synthetic IDX / CIFAR / image-folder datasets, isolation.

Plain functions and two fixtures (``isolated``, ``no_system``), which the data tests import explicitly.
(Named without test_ so that pytest does not collect it: it holds no tests.)
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from resnetlab.data import sources

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = sources.IDX_FILES


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.tobytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def make_idx_arrays(n_train: int = 40, n_test: int = 20, num_classes: int = 10, seed: int = 0, hw=(28, 28)):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % num_classes).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % num_classes).astype(np.uint8),
    }


def write_idx_dataset(d: Path, compressed: bool = True, arrays=None, **kw) -> dict[str, np.ndarray]:
    """Write the four IDX files (``.gz`` or raw) into ``d``; return the arrays."""
    arrays = arrays if arrays is not None else make_idx_arrays(**kw)
    d.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if compressed:
            (d / f"{stem}.gz").write_bytes(gz(data))
        else:
            (d / stem).write_bytes(data)
    return arrays


def cifar_batch(n: int, seed: int, num_classes: int = 10) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    return records.tobytes(), images, labels


def make_cifar_files(
    per_batch: int = 6, meta: bytes | None = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
):
    """{member name: bytes} for the six batches (and meta), plus the expected arrays."""
    files, tr_i, tr_l = {}, [], []
    for i in range(1, 6):
        data, im, la = cifar_batch(per_batch, seed=i)
        files[f"data_batch_{i}.bin"] = data
        tr_i.append(im)
        tr_l.append(la)
    data, te_i, te_l = cifar_batch(per_batch, seed=99)
    files["test_batch.bin"] = data
    if meta is not None:
        files["batches.meta.txt"] = meta
    return files, (np.concatenate(tr_i), np.concatenate(tr_l)), (te_i, te_l)


def write_cifar_tar(path: Path, files: dict[str, bytes], folder: str = "cifar-10-batches-bin") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_cifar_folder(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def snapshot(*dirs: Path) -> set[str]:
    """Every path under ``dirs`` (to assert that nothing was written)."""
    out = set()
    for d in dirs:
        if d.exists():
            out |= {str(p) for p in d.rglob("*")}
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """HOME, XDG_CACHE_HOME and $RESNETLAB_DATA in tmp_path; mirrors that cannot reach the network.

    System copies stay visible (the real Fashion-MNIST); use ``no_system`` to hide them too.
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("RESNETLAB_DATA", raising=False)
    monkeypatch.delenv("RESNETLAB_MIRROR", raising=False)
    for name in list(sources.MIRRORS):
        monkeypatch.setitem(sources.MIRRORS, name, [(tmp_path / "no-mirror").as_uri() + "/"])
    return tmp_path


@pytest.fixture
def no_system(isolated, monkeypatch):
    for name in list(sources.SYSTEM_DIRS):
        monkeypatch.setitem(sources.SYSTEM_DIRS, name, [str(isolated / "no-system" / name)])
    return isolated
