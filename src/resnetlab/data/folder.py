"""Image-folder datasets: ``PATH/<class>/<image>``, read with Pillow.

* Classes are the sorted names of PATH's sub-folders (hidden ones skipped). Files whose suffix is
  an image format Pillow reads (see ``IMAGE_SUFFIXES``) are images; other files are ignored.
* Every image is converted to one size and channel count: the ones given (``image_size``, an
  int for square or (height, width); ``channels`` 1 or 3), else inferred: the most common size
  (ties: the first in sorted order) and greyscale only when every image is greyscale (modes 1, L,
  LA, I, I;16, F), otherwise RGB. Resizing uses Pillow's bilinear filter.
* Test split: PATH/train plus PATH/test (or PATH/val) when those exist, with the classes taken
  from train; otherwise a seeded, stratified hold-out of ``HOLDOUT_FRACTION`` (10%) of each
  class (at least one image of every class with two or more; ``seed`` 0 by default).
* An image Pillow cannot read, a class folder without images, or fewer than two classes is a
  :class:`DataError`.
"""

from __future__ import annotations

import errno
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from resnetlab.errors import DataError, UsageError, first_line
from resnetlab.images import to_mode

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
HOLDOUT_FRACTION = 0.1
FOLDER_OPTIONS = ("size", "channels", "holdout", "seed")  # folder:PATH?size=32&channels=3&holdout=0.2&seed=1


def read_folder(
    path: Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    holdout: float = HOLDOUT_FRACTION,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[str]]:
    """(train images, labels), (test images, labels), classes for an image folder."""
    if channels not in (None, 1, 3):
        raise UsageError(f"channels must be 1 or 3, not {channels!r}")
    size = _size(image_size)
    if not 0.0 <= holdout < 1.0:
        raise UsageError(f"holdout must be in [0, 1), not {holdout!r}")
    try:
        is_dir = path.is_dir()
    except OSError as err:  # e.g. a name longer than the file system allows: pathlib raises instead of answering False
        raise DataError(f"{path}: {err.strerror or err}; give the image folder's path") from None
    if not is_dir:
        raise DataError(f"{path}: no such directory")
    split_dirs = {}
    for name in ("train", "test", "val"):
        if (path / name).is_dir():
            split_dirs[name] = path / name
    if "train" in split_dirs and ("test" in split_dirs or "val" in split_dirs):
        train_dir = split_dirs["train"]
        test_dir = split_dirs.get("test") or split_dirs["val"]
        classes, train_files = _scan(train_dir)
        _check_classes(train_dir, classes)
        test_classes, test_files = _scan(test_dir)
        unknown = [c for c in test_classes if c not in classes]
        if unknown:
            raise DataError(f"{test_dir}: classes {', '.join(unknown)} are not in {train_dir}")
        remap = [classes.index(c) for c in test_classes]
        test_files = [(f, remap[label]) for f, label in test_files]
    else:
        classes, files = _scan(path)
        _check_classes(path, classes)
        train_files, test_files = _holdout(files, len(classes), holdout, seed)
    infos = {f: _probe(f) for f, _ in train_files + test_files}
    if size is None:
        sizes = Counter(infos[f][0] for f, _ in train_files)  # (width, height)
        w, h = sizes.most_common(1)[0][0]
        size = (h, w)
    if channels is None:
        channels = 1 if all(infos[f][1] in GREY_MODES for f, _ in train_files + test_files) else 3
    train = _load(train_files, size, channels)
    test = _load(test_files, size, channels)
    return train, test, classes


def _size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = (image_size[0], image_size[1])
    else:
        raise UsageError(f"image_size must be an int or (height, width), not {image_size!r}")
    if not all(isinstance(v, int) and v > 0 for v in hw):
        raise UsageError(f"image size (folder option size) must be positive, not {image_size!r}")
    return hw


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    try:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        class_dirs = sorted(p for p in entries if p.is_dir())
    except OSError as err:
        raise DataError(f"{root}: cannot list ({err.strerror or err})") from None
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected PATH/<class>/<image>)")
    reals = _check_class_links(root, entries, class_dirs)
    files: list[tuple[Path, int]] = []
    seen: dict[Path, tuple[Path, int]] = {}  # the real file -> where it was found first
    for label, d in enumerate(class_dirs):
        imgs = sorted(
            p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not imgs:
            raise DataError(f"{d}: empty class: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for p in imgs:  # rglob follows no folder link below d: only p itself may be a link
            real = p.resolve() if p.is_symlink() else reals[d] / p.relative_to(d)
            first, first_label = seen.setdefault(real, (p, label))
            if first != p:  # also in one class: the hold-out could put one copy in training and one in test
                where = (
                    f"classes {d.name} and {class_dirs[first_label].name}"
                    if first_label != label
                    else f"class {d.name} twice"
                )
                raise DataError(
                    f"{p} and {first} are the same file ({real}), in {where}: a link makes one image count twice; "
                    "remove the link"
                )
        files.extend((p, label) for p in imgs)
    return [d.name for d in class_dirs], files


def _check_class_links(root: Path, entries: list[Path], class_dirs: list[Path]) -> dict[Path, Path]:
    """Refuse class-folder links that loop or that put the same images in two classes; the real folder of each class.

    Args:
        root: the folder whose sub-folders are the classes.
        entries: its visible entries.
        class_dirs: those that are folders (through links too).

    A class folder may be a link to a folder elsewhere (images kept on another disk): that is
    allowed. Refused are a link that loops (it was skipped silently), and a link whose target
    overlaps the dataset: the root or a folder above it (``ln -s . data/c`` put every image in
    class c as well as in its own), another class's folder, or a folder inside one. Links to
    single images are checked by the file they reach, in :func:`_scan`.
    """
    for p in entries:
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise DataError(
                        f"{p} is a symbolic link that loops; remove it or point it at a folder of images"
                    ) from None
    real_root = root.resolve()
    reals = {d: d.resolve() for d in class_dirs}
    fix = "remove the link, or point it at a folder of this class's images only"
    for d, real in reals.items():
        if real == real_root or real in real_root.parents:
            raise DataError(
                f"{d} is a link to {real}, which holds the whole dataset {root}: "
                f"every image would be in two classes; {fix}"
            )
    for d, real in reals.items():
        for other, other_real in reals.items():
            if other != d and (real == other_real or other_real in real.parents):  # d's images are some of other's
                link, target = (d, other) if d.is_symlink() else (other, d)
                raise DataError(
                    f"{link} is a link to {reals[link]}, which overlaps class folder {target}: the same images "
                    f"would be in two classes; {fix}"
                )
    return reals


def _check_classes(root: Path, classes: list[str]) -> None:
    """A classifier needs two classes; one alone would train to a meaningless 100% accuracy."""
    if len(classes) >= 2:
        return
    if classes[0] in ("train", "test", "val"):  # half of a train/test layout, read as PATH/<class>
        missing = "test/ or val/" if classes[0] == "train" else "train/"
        raise DataError(
            f"{root} has {classes[0]}/ but no {missing} beside it: add it (PATH/train/<class>/..., "
            f"PATH/test/<class>/...), or put the class folders directly in {root} for a hold-out"
        )
    raise DataError(f"{root}: only one class ({classes[0]}); a classifier needs two or more class sub-folders")


def _holdout(
    files: list[tuple[Path, int]], num_classes: int, fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(num_classes):
        members = [f for f in files if f[1] == c]
        n = len(members)
        k = 0 if n < 2 or fraction == 0 else min(n - 1, max(1, round(fraction * n)))
        order = torch.randperm(n, generator=g).tolist()
        chosen = set(order[:k])
        test.extend(m for i, m in enumerate(members) if i in chosen)
        train.extend(m for i, m in enumerate(members) if i not in chosen)
    return train, test


def _probe(path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Image.DecompressionBombError as err:  # not an OSError; every image is probed before _load opens it
        raise DataError(
            f"{path}: too large to decode safely ({err}); downscale it or remove it from the folder"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: unreadable image ({first_line(err)})") from None


def _load(files: list[tuple[Path, int]], size: tuple[int, int], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        images = np.empty((len(files), h, w, channels), dtype=np.uint8)
    except MemoryError:  # numpy refuses at once; a size that fits is the user's to choose
        need = len(files) * h * w * channels
        raise DataError(
            f"{len(files)} images at {h}x{w}x{channels} need {need / 2**30:,.0f} GiB of memory, more than can be "
            f"allocated; choose a smaller size with folder:PATH?size=N (e.g. size=64)"
        ) from None
    labels = np.empty(len(files), dtype=np.int64)
    mode = "L" if channels == 1 else "RGB"
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as im:
                im = to_mode(im, mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise DataError(f"{path}: unreadable image ({first_line(err)})") from None
        images[i] = arr.reshape(h, w, channels)
        labels[i] = label
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to be one
        return False


def parse_folder_name(name: str) -> tuple[str, dict[str, str]]:
    """Split ``folder:PATH?size=32&channels=3`` into PATH and its options."""
    spec = name[len("folder:") :]
    options: dict[str, str] = {}
    if "?" in spec:
        base, _, query = spec.rpartition("?")
        pairs = [p.partition("=") for p in query.split("&") if p]
        if pairs and all(sep and k in FOLDER_OPTIONS for k, sep, _ in pairs):
            spec = base
            options = {k: v for k, _, v in pairs}
        elif pairs and all(sep for _, sep, _ in pairs) and not _is_dir(Path(spec)) and _is_dir(Path(base)):
            # a "?" may belong to a directory's name, but here only the part before it is one
            unknown = ", ".join(k for k, _, _ in pairs if k not in FOLDER_OPTIONS)
            raise UsageError(
                f"unknown folder option(s) {unknown} in {name}; the options are {', '.join(FOLDER_OPTIONS)}, "
                "e.g. folder:PATH?holdout=0.2&seed=1"
            )
    if not spec:
        raise UsageError("folder: needs a path, e.g. folder:/data/flowers")
    return spec, options


def folder_options(options: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        if "size" in options:
            parts = options["size"].lower().split("x")
            out["image_size"] = int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if "channels" in options:
            out["channels"] = int(options["channels"])
        if "holdout" in options:
            out["holdout"] = float(options["holdout"])
        if "seed" in options:
            out["seed"] = int(options["seed"])
    except ValueError:
        given = "&".join(f"{k}={v}" for k, v in options.items())
        raise UsageError(
            f"folder options {given} are not all numbers; e.g. size=32 (or 32x48), channels=1 or 3, holdout=0.2, seed=1"
        ) from None
    if isinstance(out.get("holdout"), float) and not math.isfinite(out["holdout"]):  # type: ignore[arg-type]
        raise UsageError("holdout must be finite")
    if not -(2**63) <= out.get("seed", 0) < 2**64:  # type: ignore[operator]
        raise UsageError(f"folder seed must be in torch's range [-2**63, 2**64 - 1], not {out['seed']}")
    return out
