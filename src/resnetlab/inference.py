"""Inference from a checkpoint: :class:`Classifier` (the network with its own preprocessing) and
:func:`load_checkpoint`.

Training, evaluation, prediction, export and the benchmarks use it; it reads the file format of
:mod:`resnetlab.checkpoint` and computes in fp32 unless asked otherwise (the precision policy in
:mod:`resnetlab.device`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.checkpoint import load_weights, prefixed, read_checkpoint
from resnetlab.device import autocast_dtype
from resnetlab.models import fold_batchnorm

__all__ = ["Classifier", "load_checkpoint"]


class Classifier(nn.Module):
    """A trained network with its own preprocessing: float images in [0, 1] at native size -> logits.

    Args:
        net: the ResNet.
        preprocess: resize and normalisation (:class:`resnetlab.data.Preprocess`).
        classes: class names, in label order.
        tta: also run the mirror image and average the logits.
        tta_translate: also run the image shifted by this many pixels up-left and down-right (the
            borders black, as the training crops pad), weighted 1/2, 1/4, 1/4 (each with its mirror
            image where ``tta``); 0: no shifts.
        precision: ``fp32`` (the default everywhere: the same probabilities on every machine, and
            those of the ONNX export), or ``bf16``/``fp16`` autocast inside ``forward`` (opt-in).
        input_shape: native (C, H, W) the model expects.
    """

    def __init__(
        self,
        net: nn.Module,
        preprocess: nn.Module,
        classes: list[str],
        *,
        tta: bool = False,
        tta_translate: int = 0,
        precision: str = "fp32",
        input_shape: tuple[int, int, int] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        self.classes = list(classes)
        self.tta = tta
        self.tta_translate = tta_translate
        self.precision = precision
        self.input_shape = tuple(input_shape) if input_shape else None
        self.channels_last = channels_last

    def folded(self) -> "Classifier":
        """An eval-mode copy with BatchNorm folded into the convolutions (:func:`resnetlab.models.fold_batchnorm`):
        the same predictions up to rounding, in fewer kernels. Every accuracy is measured on it."""
        return Classifier(
            fold_batchnorm(self.net),
            self.preprocess,
            self.classes,
            tta=self.tta,
            tta_translate=self.tta_translate,
            precision=self.precision,
            input_shape=self.input_shape,
            channels_last=self.channels_last,
        ).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.precision)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = self._view_logits(x)
            if self.tta_translate:
                up_left, down_right = self._shifted(x, self.tta_translate)
                logits = logits / 2 + (self._view_logits(up_left) + self._view_logits(down_right)) / 4
        return logits.float()

    def _view_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return (logits + self.net(x.flip(3))) / 2 if self.tta else logits

    def _shifted(self, x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (preprocessed) moved ``shift`` pixels up-left and down-right, black coming in at the borders."""
        black = -self.preprocess.mean / self.preprocess.std  # 0 in [0, 1] units, as a training crop pads
        h, w = x.shape[-2:]
        padded = F.pad(x - black, (shift,) * 4) + black
        views = padded[..., :h, :w], padded[..., 2 * shift : 2 * shift + h, 2 * shift : 2 * shift + w]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return views[0].contiguous(memory_format=layout), views[1].contiguous(memory_format=layout)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32") -> Classifier:
    """Load a resnetlab checkpoint as a :class:`Classifier` in eval mode.

    Args:
        path: a run directory or its ``last.safetensors``.
        device: where to put the model.
        precision: ``fp32`` (default: the same results on every machine, whatever the run trained
            in), ``bf16`` or ``fp16`` (autocast; opt-in, for speed where it is native).

    The result maps float images in [0, 1] (N x C x H x W at the dataset's native size) to logits;
    its ``.classes`` holds the class names and ``.meta`` the checkpoint's metadata.
    """
    from resnetlab.data import Preprocess
    from resnetlab.models import create_model

    tensors, meta = read_checkpoint(path)
    spec = meta["model"]
    net = create_model(spec["name"], **spec["options"])
    load_weights(
        net,
        prefixed(tensors, "model."),
        f"{path}: the weights do not fit the {spec['name']} {spec['options']} its metadata describes",
    )
    classifier = Classifier(
        net,
        Preprocess.from_config(meta["preprocessing"]),
        meta["classes"],
        tta=meta.get("tta", False),
        tta_translate=meta.get("tta_translate", 0),
        precision=precision,
        input_shape=tuple(meta["input_shape"]),
        channels_last=meta.get("channels_last", False),
    )
    classifier.meta = meta
    if classifier.channels_last:
        classifier.net.to(memory_format=torch.channels_last)
    return classifier.to(device).eval()
