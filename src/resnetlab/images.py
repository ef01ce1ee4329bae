"""Image-file helpers shared by the folder dataset and ``predict`` (numpy and Pillow only, no torch:
``predict --onnx`` must not import it)."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_mode(im: Any, mode: str) -> Any:
    """A Pillow image in ``mode`` (``L`` or ``RGB``) the way training and prediction both read it.

    Pillow's own ``convert`` clips 16-bit and 32-bit greyscale to 255 (a 16-bit image turns white),
    and drops a palette's transparency oddly; those are handled first.
    """
    from PIL import Image

    if im.mode == mode:
        return im
    if im.mode.startswith("I;16"):  # 16-bit greyscale: keep the high byte rather than clip
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
    elif im.mode in ("I", "F"):
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # then the colour channels are kept, alpha dropped
    return im.convert(mode)
