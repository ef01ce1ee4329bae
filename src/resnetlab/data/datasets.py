"""``Split`` and ``load_dataset``: whole datasets as uint8 tensors in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from resnetlab.data import sources
from resnetlab.data.idx import read_idx
from resnetlab.data.sources import DEFAULT_DATASET, Location
from resnetlab.errors import DataError, UsageError


@dataclass
class Split:
    """One split of a dataset: every image as one uint8 N x C x H x W tensor, labels int64 N."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    source: str = field(default="", repr=False)  # where it was read from (for messages)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UsageError(
                f"Split.images must be a uint8 N x C x H x W tensor, not {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise UsageError(
                f"Split.labels must be an int64 vector, not {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise UsageError(f"Split has {len(self.images)} images but {len(self.labels)} labels")
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "Split":
        """A new Split of the given rows (in that order; copies them)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise UsageError(f"subset indices out of range for a split of {len(self)} images")
        idx = idx.to(self.images.device)
        return Split(
            self.images.index_select(0, idx),
            self.labels.index_select(0, idx.to(self.labels.device)),
            self.classes,
            self.name,
            self.source,
        )

    def class_counts(self) -> list[int]:
        """Number of images of each class, in ``classes`` order."""
        return torch.bincount(self.labels.cpu(), minlength=len(self.classes)).tolist()


def load_dataset(
    name: str = DEFAULT_DATASET,
    root: str | os.PathLike | None = None,
    download: bool = True,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    holdout: float | None = None,
    seed: int | None = None,
    quiet: bool = False,
) -> tuple[Split, Split]:
    """Load (train, test) of ``fashion-mnist`` (default), ``mnist``, ``cifar10`` or ``folder:PATH``.

    Built-in datasets are looked for in ``root``, ``$RESNETLAB_DATA``, the user cache and the
    system copies (see :mod:`resnetlab.data.sources`), then downloaded into the cache when
    ``download`` is true. They are returned at their native size (1x28x28, 3x32x32); resizing is
    the pipeline's job. ``image_size``, ``channels``, ``holdout`` (default 0.1) and ``seed`` (of the
    hold-out, default 0) apply to folder datasets only, which also accept them in the name:
    ``folder:PATH?size=32&channels=3&holdout=0.2&seed=1``.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"dataset name must be a non-empty string, not {name!r}")
    if name.startswith("folder:"):
        return _load_folder(name, image_size=image_size, channels=channels, holdout=holdout, seed=seed)
    if image_size is not None or channels is not None or holdout is not None or seed is not None:
        raise UsageError(
            "image_size, channels, holdout and seed apply to folder:PATH datasets; built-in datasets load at their "
            "native size (resize in the pipeline)"
        )
    loc = find_or_fetch(name, root, download, quiet=quiet)
    return load_location(loc)


def find_or_fetch(name: str, root: str | os.PathLike | None, download: bool, *, quiet: bool = False) -> Location:
    """Locate built-in ``name``, downloading it into the cache when allowed; else one DataError."""
    sources.spec(name)
    loc, places = sources.locate(name, root)
    if loc is not None:
        return loc
    if not download:
        raise DataError(sources.not_found_message(name, places, "downloading is off (download=False)"))
    try:
        return sources.fetch(name, quiet=quiet)
    except DataError as err:
        raise DataError(sources.not_found_message(name, places, str(err))) from None


def load_location(loc: Location) -> tuple[Split, Split]:
    ds = sources.spec(loc.name)
    if ds.kind == "idx":
        f = loc.files
        train = _idx_split(f["train-images-idx3-ubyte"], f["train-labels-idx1-ubyte"], list(ds.classes), loc.name)
        test = _idx_split(f["t10k-images-idx3-ubyte"], f["t10k-labels-idx1-ubyte"], list(ds.classes), loc.name)
        return train, test
    from resnetlab.data.cifar import read_cifar_archive, read_cifar_folder

    if loc.form == "archive":
        path = loc.files[sources.CIFAR_ARCHIVE]
        (tri, trl), (tei, tel), classes = read_cifar_archive(path)
    else:
        path = loc.files[sources.CIFAR_TRAIN[0]].parent
        (tri, trl), (tei, tel), classes = read_cifar_folder(path)
    return (
        _split_from_numpy(tri, trl, classes, loc.name, str(path)),
        _split_from_numpy(tei, tel, classes, loc.name, str(path)),
    )


def _idx_split(images_path: Path, labels_path: Path, classes: list[str], name: str) -> Split:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{images_path}: contains no images")
    if int(labels.max()) >= len(classes):
        bad = int(np.argmax(labels >= len(classes)))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{len(classes) - 1}")
    n, h, w = images.shape
    return _split_from_numpy(images.reshape(n, 1, h, w), labels, classes, name, str(images_path))


def _split_from_numpy(images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, source: str) -> Split:
    # torch.from_numpy shares the buffer: no copy of the images; labels widen to int64 (small)
    return Split(torch.from_numpy(images), torch.from_numpy(labels).to(torch.int64), list(classes), name, source)


def _load_folder(name: str, **given: object) -> tuple[Split, Split]:
    from resnetlab.data.folder import folder_options, parse_folder_name, read_folder

    path, options = parse_folder_name(name)
    kwargs = folder_options(options)
    for k, v in given.items():
        if v is not None:
            kwargs[k] = v
    (tri, trl), (tei, tel), classes = read_folder(Path(path).expanduser(), **kwargs)  # type: ignore[arg-type]
    return Split(tri, trl, classes, name, path), Split(tei, tel, classes, name, path)
