"""``resnetlab export``: a checkpoint -> one self-contained ONNX file, verified with onnxruntime.

The exported graph is the checkpoint's whole :class:`~resnetlab.inference.Classifier`:

* input ``images``: float32 N x C x H x W in [0, 1] at the dataset's native size (dynamic N);
* the preprocessing inside (antialiased bilinear resize, per-channel normalisation), then the
  network, and the flip test-time augmentation when the checkpoint uses it;
* output ``logits``: N x classes, in fp32 (a checkpoint evaluated in bf16/fp16 is exported in fp32);
* ``metadata_props``: ``classes`` (JSON list), ``input_shape`` (JSON [C, H, W]), ``model`` (the
  registry name) and ``model_options``, ``dataset``, ``preprocessing``, ``tta``, ``producer``.

It uses PyTorch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) at opset >= 18, the
first whose ``Resize`` has the ``antialias`` attribute. Before the file is put in place,
onnxruntime runs it on real test images of the checkpoint's dataset (the first 64; random
images when the dataset cannot be found locally, which is said) and its logits must match
PyTorch's within 1e-4 (max abs difference); otherwise nothing is written and the command fails.
The file is written to a temporary name beside the destination and renamed, so a reader never
sees half a file, nor an unverified one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from resnetlab.errors import CheckpointError, ResnetlabError, UsageError
from resnetlab.fileio import EXPORT_NAME, fsync_dir, umask_mode
from resnetlab.onnx_runtime import META_CLASSES, META_INPUT_SHAPE, META_MODEL, require_onnx

__all__ = ["export_onnx", "ExportResult", "run_export", "DEFAULT_OPSET", "MIN_OPSET", "TOLERANCE"]

DEFAULT_OPSET = 18
MIN_OPSET = 18  # Resize gained the antialias attribute in opset 18
TOLERANCE = 1e-4  # max abs difference of onnxruntime's and PyTorch's fp32 logits
VERIFY_IMAGES = 64
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_NAME = EXPORT_NAME


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: Path
    opset: int
    max_abs_diff: float
    verified_on: str  # e.g. "the first 64 fashion-mnist test images"
    size_bytes: int
    notes: tuple[str, ...] = ()


def max_opset() -> int:
    """The newest opset the installed PyTorch exporter targets."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # private module: be lenient if it moves
        return 23


def check_opset(opset: int | None) -> int:
    """``--opset`` -> a usable opset (default 18), or UsageError."""
    if opset is None:
        return DEFAULT_OPSET
    if opset < MIN_OPSET:
        raise UsageError(
            f"--opset {opset} is too old: the preprocessing's antialiased Resize needs opset {MIN_OPSET} or newer; "
            f"use --opset {DEFAULT_OPSET} (the default)"
        )
    newest = max_opset()
    if opset > newest:
        raise UsageError(
            f"--opset {opset} is newer than this PyTorch can export (at most {newest}); use {MIN_OPSET}..{newest}"
        )
    return opset


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (e.g. "torchvision is not installed. Skipping ...")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _metadata(classifier: Any) -> dict[str, str]:
    from resnetlab import __version__

    meta = getattr(classifier, "meta", {}) or {}
    model = meta.get("model", {})
    return {
        META_CLASSES: json.dumps(list(classifier.classes)),
        META_INPUT_SHAPE: json.dumps(list(classifier.input_shape)),
        META_MODEL: str(model.get("name", "")),
        "model_options": json.dumps(model.get("options", {})),
        "dataset": str(meta.get("dataset", "")),
        "preprocessing": json.dumps(classifier.preprocess.config() if hasattr(classifier.preprocess, "config") else {}),
        "tta": json.dumps(bool(classifier.tta)),
        "tta_translate": json.dumps(int(classifier.tta_translate)),
        "input": f"{INPUT_NAME}: float32 N x {'x'.join(map(str, classifier.input_shape))} in [0, 1]",
        "output": f"{OUTPUT_NAME}: float32 N x {len(classifier.classes)}",
        "producer": f"resnetlab {__version__}",
    }


def _export_to(classifier: Any, opset: int, path: Path) -> None:
    """Export ``classifier`` (fp32, eval) with a dynamic batch and resnetlab metadata to ``path``."""
    import torch

    c, h, w = classifier.input_shape
    example = torch.rand(2, c, h, w)  # 2, not 1: torch.export specialises size-1 dimensions
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            classifier,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    program.model.metadata_props.update(_metadata(classifier))
    program.save(str(path), external_data=False)


def _reference_logits(classifier: Any, images: np.ndarray) -> np.ndarray:
    """PyTorch's logits of ``images`` (the export's reference)."""
    import torch

    with torch.no_grad():
        return classifier(torch.from_numpy(images)).numpy()


def verification_images(
    classifier: Any, data_root: str | None = None, n: int = VERIFY_IMAGES
) -> tuple[np.ndarray, str]:
    """The first ``n`` test images of the checkpoint's dataset as float32 in [0, 1], and what they are.

    Nothing is downloaded: when the dataset is not found locally (or its images have another
    shape), ``n`` seeded random images are used instead and the description says why.
    """
    meta = getattr(classifier, "meta", {}) or {}
    name = meta.get("dataset")
    shape = tuple(classifier.input_shape)
    try:
        if not name:
            raise CheckpointError("the checkpoint does not name its dataset")
        from resnetlab.data import load_dataset

        _, test = load_dataset(name, root=data_root or meta.get("data_root"), download=False, quiet=True)
        if tuple(test.images.shape[1:]) != shape:
            raise CheckpointError(f"its images are {tuple(test.images.shape[1:])}, the model takes {shape}")
        if len(test) == 0:
            raise CheckpointError("its test split is empty")
        images = (test.images[:n].float() / 255).numpy()
        return images, f"the first {len(images)} {name} test images"
    except (ResnetlabError, OSError) as err:
        rng = np.random.default_rng(0)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return rng.random(
            (n, *shape), dtype=np.float32
        ), f"{n} random images ({name or 'the dataset'} not loaded: {reason})"


def _onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    from resnetlab.onnx_runtime import OnnxClassifier

    return OnnxClassifier(path).logits(images)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("nan") if not np.isfinite(d).all() else float(d.max())


def _temp_beside(dest: Path) -> Path:
    """An empty temporary file in ``dest``'s directory (created if missing), or UsageError saying why not."""
    blocker = next((d for d in reversed(dest.parents) if d.exists() and not d.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write --out {dest}: {blocker} is a file, not a directory; choose another path")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as err:  # no permission, a read-only or virtual file system (/proc), ...
        raise UsageError(
            f"cannot write --out {dest}: cannot create files in {dest.parent} "
            f"({err.strerror or err}); choose another path"
        ) from None
    os.close(fd)
    return Path(name)


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    data_root: str | None = None,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export a checkpoint to ONNX, check it with onnxruntime, and write it atomically.

    Args:
        checkpoint: a run directory or its ``last.safetensors``.
        out: the ``.onnx`` file (default: ``model.onnx`` beside the checkpoint).
        opset: ONNX opset, >= 18 (default 18).
        data_root: where to look for the checkpoint's dataset (for the check images).
        tolerance: largest accepted max abs difference of the logits.

    Raises:
        UsageError: the ONNX extra is missing, a bad opset, or an ``out`` that is the checkpoint
            itself or cannot be written.
        CheckpointError: an unreadable checkpoint, or onnxruntime's logits differ from
            PyTorch's by more than ``tolerance`` (nothing is written then).
    """
    require_onnx("resnetlab export")
    opset = check_opset(opset)
    from resnetlab.checkpoint import resolve_checkpoint_path
    from resnetlab.inference import load_checkpoint
    from resnetlab.train.rundir import RUN_FILES

    ckpt = resolve_checkpoint_path(checkpoint)
    given = Path(out) if out else ckpt.parent / DEFAULT_NAME
    # The atomic write renames a temporary file over dest: through a link that would replace the link
    # (not write its target), so write the target; and refuse a FIFO or device (as root: /dev/null).
    dest = Path(os.path.realpath(given))
    named = str(given) if str(dest) == os.path.abspath(given) else f"{given} (-> {dest})"
    if dest.is_dir():
        raise UsageError(f"--out {named} is a directory; give a file name such as {given / DEFAULT_NAME}")
    if dest.exists() and not dest.is_file():
        raise UsageError(
            f"--out {named} is not a regular file (a device, FIFO or socket); "
            f"give a file name such as {ckpt.parent / DEFAULT_NAME}"
        )
    if dest.exists() and os.path.samefile(dest, ckpt):  # any spelling or link of it: the export would replace it
        raise UsageError(
            f"--out {given} is the checkpoint being exported and would be lost; "
            f"give another file such as {ckpt.parent / DEFAULT_NAME}"
        )
    if dest.name in RUN_FILES and dest.exists() and os.path.samefile(dest.parent, ckpt.parent):
        raise UsageError(
            f"--out {given} is a file of the run being exported ({dest.name}) and would be lost; "
            f"give another file such as {ckpt.parent / DEFAULT_NAME}"
        )
    if dest.exists() and dest.suffix.lower() != ".onnx":  # another run's checkpoint, a user's notes...
        raise UsageError(
            f"--out {named} exists and is not an .onnx file; export replaces only an earlier export: "
            f"give a new file name or an .onnx file, such as {ckpt.parent / DEFAULT_NAME}"
        )
    classifier = load_checkpoint(ckpt)  # in fp32, as the export computes
    notes: list[str] = []
    images, source = verification_images(classifier, data_root)

    tmp = _temp_beside(dest)
    try:
        _export_to(classifier, opset, tmp)
        ref = _reference_logits(classifier, images)
        diff = max(_max_abs_diff(_onnx_logits(tmp, images), ref), _max_abs_diff(_onnx_logits(tmp, images[:1]), ref[:1]))
        if not diff <= tolerance:  # also catches NaN
            raise CheckpointError(
                f"export check failed: onnxruntime's logits differ from PyTorch's by {diff:.3g} (max abs, "
                f"tolerance {tolerance:g}) on {source}; {dest} was not written (try another --opset, or report a bug)"
            )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask_mode(tmp)  # mkstemp's 0600 is wrong for a file meant to be shipped
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return ExportResult(dest, opset, diff, source, dest.stat().st_size, tuple(notes))


def run_export(args: argparse.Namespace) -> int:
    """``resnetlab export CHECKPOINT [--format onnx] [--out FILE] [--opset N] [--data-root DIR]``."""
    if getattr(args, "format", "onnx") != "onnx":
        raise UsageError(f"unknown export format {args.format!r}; use --format onnx")
    result = export_onnx(args.checkpoint, args.out, opset=args.opset, data_root=getattr(args, "data_root", None))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.path} (ONNX opset {result.opset}, {result.size_bytes / 1e6:.1f} MB)")
    print(
        f"verified with onnxruntime on {result.verified_on}: "
        f"max abs diff {result.max_abs_diff:.2e} (tolerance {TOLERANCE:g})"
    )
    return 0
