"""Run an exported ONNX classifier with onnxruntime alone: numpy + onnxruntime, never torch.

``resnetlab export`` writes a self-contained model (preprocessing inside: float images in [0, 1]
at the dataset's native size in, ``logits`` out, dynamic batch) and stores the class names and
the input shape in its ``metadata_props``. :class:`OnnxClassifier` reads them back, so
``resnetlab predict --onnx model.onnx IMAGE...`` needs neither torch nor the checkpoint.

    >>> from resnetlab.onnx_runtime import OnnxClassifier
    >>> model = OnnxClassifier("runs/fast/model.onnx")
    >>> model.input_shape, model.classes[:2]
    ((1, 28, 28), ['T-shirt/top', 'Trouser'])
    >>> logits = model.logits(batch)          # float32 N x 1 x 28 x 28 in [0, 1] -> N x 10

Files exported elsewhere also load when their single input has a static C x H x W; without
resnetlab metadata the classes are named by index ("0", "1", ...).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from resnetlab.errors import CheckpointError, UsageError, first_line
from resnetlab.fileio import EXPORT_NAME  # where `resnetlab export RUN` writes, in the run directory

__all__ = ["OnnxClassifier", "require_onnx", "ONNX_EXTRA", "META_CLASSES", "META_INPUT_SHAPE", "META_MODEL"]

ONNX_EXTRA = "pip install 'resnetlab[onnx]'"

# metadata_props keys written by resnetlab.export and read here (values are strings; JSON where noted)
META_CLASSES = "classes"  # JSON list of class names, in logit order
META_INPUT_SHAPE = "input_shape"  # JSON [C, H, W]: native size; values are floats in [0, 1]
META_MODEL = "model"  # registry name, e.g. "resnet18"


def require_onnx(what: str, modules: Sequence[str] = ("onnx", "onnxscript", "onnxruntime")) -> list[ModuleType]:
    """Import the optional ONNX packages, or raise UsageError saying what to install.

    Args:
        what: the feature needing them, for the message (e.g. "resnetlab export").
        modules: the packages needed.
    """
    loaded, missing, reason = [], [], ""
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as err:
            missing.append(name)
            if not reason:
                reason = first_line(err)
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)} ({reason}); install the ONNX extra: {ONNX_EXTRA}")
    return loaded


class OnnxClassifier:
    """An ONNX image classifier run by onnxruntime.

    Args:
        path: the ``.onnx`` file (from ``resnetlab export``), or a run directory holding its ``model.onnx``.
        providers: onnxruntime execution providers, in order of preference (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).

    Attributes:
        input_shape: (C, H, W) the model takes (float32 in [0, 1]).
        classes: class names, in logit order.
        model_name: the registry name when the file came from resnetlab, else None.
        metadata: every ``metadata_props`` entry of the file.
    """

    def __init__(
        self, path: str | os.PathLike, *, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        (ort,) = require_onnx("running an ONNX model (predict --onnx)", ("onnxruntime",))
        p = Path(path)
        if p.is_dir():  # a run directory: its export
            p = p / EXPORT_NAME
        if not p.is_file():
            raise CheckpointError(f"no ONNX model at {p}; export one with `resnetlab export CHECKPOINT`")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(p), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise CheckpointError(f"{p} is not a usable ONNX model ({first_line(err)}); export it again") from None
        self.path = p
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise CheckpointError(f"{p} has {len(inputs)} inputs; an image classifier takes one N x C x H x W batch")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.model_name: str | None = self.metadata.get(META_MODEL)
        self.input_shape = self._input_shape(inputs[0].shape)
        try:  # one blank image: a model that cannot run, or is no classifier, is refused here, not mid-predict
            out = np.asarray(self.logits(np.zeros((1, *self.input_shape), np.float32)))
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise CheckpointError(
                f"{p} fails on a blank {'x'.join(map(str, self.input_shape))} image "
                f"({first_line(err)}); export it again"
            ) from None
        self.classes = self._classes(out.shape[-1] if out.ndim else 0)
        if out.shape != (1, len(self.classes)):
            raise CheckpointError(
                f"{p} outputs shape {list(out.shape)} for one image; a classifier outputs 1 x {len(self.classes)} "
                "logits (one per class); export it with `resnetlab export`"
            )

    def _input_shape(self, graph_shape: list[Any]) -> tuple[int, int, int]:
        raw = self.metadata.get(META_INPUT_SHAPE)
        if raw is not None:
            try:
                shape = tuple(int(v) for v in json.loads(raw))
            except (ValueError, TypeError):
                raise CheckpointError(f"{self.path} has a corrupt input_shape in its metadata ({raw!r})") from None
        else:
            shape = tuple(graph_shape[1:]) if len(graph_shape) == 4 else ()
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise CheckpointError(
                f"{self.path} does not say its input size (no input_shape metadata, input {graph_shape}); "
                "export it with `resnetlab export`"
            )
        return shape  # type: ignore[return-value]

    def _classes(self, outputs: int) -> list[str]:
        raw = self.metadata.get(META_CLASSES)
        if raw is not None:
            try:
                classes = json.loads(raw)
            except ValueError:
                raise CheckpointError(f"{self.path} has corrupt class names in its metadata") from None
            if not isinstance(classes, list) or not classes:
                raise CheckpointError(f"{self.path} has corrupt class names in its metadata")
            return [str(c) for c in classes]
        return [str(i) for i in range(outputs)]  # no names: the logits' indices

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W images in [0, 1] (at ``input_shape``) -> N x classes logits."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            want = "x".join(map(str, self.input_shape))
            raise UsageError(f"the ONNX model takes N x {want} images, not {'x'.join(map(str, x.shape))}")
        return self.session.run([self.output_name], {self.input_name: x})[0]

    __call__ = logits

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({str(self.path)!r}, model={self.model_name}, "
            f"input_shape={self.input_shape}, classes={len(self.classes)})"
        )
