"""``resnetlab predict``: top-k classes for image files, from a checkpoint or an ONNX file.

Image reading is numpy + Pillow only, so the ``--onnx`` path runs with onnxruntime and never
imports torch (a small deployment path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from resnetlab.errors import UsageError
from resnetlab.images import to_mode


def read_image(path: str | Path, channels: int, height: int, width: int) -> np.ndarray:
    """An image file -> float32 C x H x W in [0, 1], converted to the model's channels and size.

    Raises ValueError with a one-line reason when the file is missing or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    if Path(path).exists() and not Path(path).is_file():  # opening a FIFO waits for a writer, maybe forever
        raise ValueError("not a regular file (a FIFO, device or directory); give an image file")
    try:
        with Image.open(path) as im:
            im.load()
            im = to_mode(im, "L" if channels == 1 else "RGB")  # as the folder dataset reads it for training
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except Image.DecompressionBombError as err:  # not an OSError: Pillow refuses it before decoding
        raise ValueError(f"too large to decode safely ({err}); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"not a readable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def softmax_topk(logits: np.ndarray, classes: list[str], k: int) -> list[dict[str, float]]:
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p)[:k]
    return [{"class": classes[i], "index": int(i), "probability": float(p[i])} for i in order]


def run_predict(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, not {args.topk}")
    images = list(args.images)
    if args.onnx:
        if args.precision != "fp32":
            raise UsageError(
                f"--precision {args.precision} applies to a checkpoint; an ONNX model computes in fp32: drop it"
            )
        if args.checkpoint:  # with --onnx the first positional is an image, not a checkpoint
            images.insert(0, args.checkpoint)
        from resnetlab.onnx_runtime import OnnxClassifier

        model = OnnxClassifier(args.onnx)
        shape, classes, run = model.input_shape, model.classes, model.logits
    else:
        if not args.checkpoint:
            raise UsageError("give a checkpoint (a run directory or last.safetensors), or --onnx MODEL")
        import torch

        from resnetlab.device import resolve_precision, warn_if_emulated
        from resnetlab.inference import load_checkpoint

        cpu = torch.device("cpu")
        precision = resolve_precision(args.precision, cpu, inference=True)
        warn_if_emulated(precision, cpu)
        classifier = load_checkpoint(args.checkpoint, precision=precision)
        shape, classes = classifier.input_shape, classifier.classes

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return classifier(torch.from_numpy(batch)).numpy()

    if not images:
        raise UsageError("give one or more image files to predict")
    return _predict_files(images, shape, classes, run, args.topk, args.json)


def _predict_files(images: list[str], shape, classes: list[str], run, topk: int, as_json: bool) -> int:
    """Predict every readable image; report unreadable ones and exit 2 if there were any."""
    c, h, w = shape
    results, failed = [], 0
    for path in images:
        try:
            x = read_image(path, c, h, w)
        except ValueError as err:
            failed += 1
            print(f"resnetlab: error: {path}: {err}", file=sys.stderr)
            results.append({"image": path, "error": str(err)})
            continue
        top = softmax_topk(run(x[None])[0], classes, min(topk, len(classes)))
        results.append({"image": path, "top": top})
        if not as_json:
            print(f"{path}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in top))
    if as_json:
        print(json.dumps(results))
    return 2 if failed else 0
