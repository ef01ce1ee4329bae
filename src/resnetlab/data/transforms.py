"""Batched image transforms on whole N x C x H x W tensors, on any device.

No per-sample Python and no PIL. The random transforms take a CPU ``torch.Generator`` and draw
all their parameters on the CPU (a few numbers per image), then apply them vectorised on the
batch's device, so a given generator state gives the same result on CPU, CUDA or MPS.

``resize`` is bilinear with antialiasing (``F.interpolate(..., antialias=True)``), which matches
the chapter's ``Resize`` (PIL ``Image.resize(size, BILINEAR)`` then ``ToTensor``) to well under
1/255 mean absolute difference; the test suite checks it on real Fashion-MNIST at 96x96.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.errors import UsageError

__all__ = ["to_float", "resize", "normalize", "random_crop", "random_flip", "random_erasing", "Preprocess"]


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> floating point in [0, 1] (on x's device)."""
    if x.dtype != torch.uint8:
        raise UsageError(f"to_float expects uint8 images, not {x.dtype}")
    return x.to(dtype).div_(255)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2:
        hw = (int(size[0]), int(size[1]))
    else:
        raise UsageError(f"size must be an int or (height, width), not {size!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise UsageError(f"size must be positive, not {size!r}")
    return hw


def _batch(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise UsageError(f"{what} expects an N x C x H x W batch (or one C x H x W image), not shape {tuple(x.shape)}")
    return x, False


def resize(x: torch.Tensor, size: int | Sequence[int], *, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size`` (int: square; or (height, width))."""
    if not x.is_floating_point():
        raise UsageError(f"resize expects float images (call to_float first), not {x.dtype}")
    hw = _hw(size)
    xb, single = _batch(x, "resize")
    if tuple(xb.shape[-2:]) == hw:
        return x
    out = F.interpolate(xb, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    return out[0] if single else out


def _per_channel(v: float | Sequence[float] | torch.Tensor, c: int, what: str, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype if like.is_floating_point() else torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise UsageError(f"{what} has {t.numel()} values for {c} channels")
    return t.to(like.device).reshape(1, c, 1, 1)


def normalize(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel (scalars apply to every channel)."""
    if not x.is_floating_point():
        raise UsageError(f"normalize expects float images, not {x.dtype}")
    xb, single = _batch(x, "normalize")
    c = xb.shape[1]
    m = _per_channel(mean, c, "mean", xb)
    s = _per_channel(std, c, "std", xb)
    if bool((s == 0).any()):
        raise UsageError("std must not contain zeros")
    out = (xb - m) / s
    return out[0] if single else out


def _to(params: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random parameters, drawn on the CPU (the same numbers on every device), onto the images' device.

    On CUDA without waiting: from pageable memory CUDA stages the few bytes at once and returns,
    where a blocking copy waits for the GPU to finish the queued steps. Not on MPS, where a
    non-blocking copy of a short-lived CPU tensor can arrive corrupted (pytorch/pytorch#139550).
    """
    return params.to(device, non_blocking=device.type == "cuda")


def _check_gen(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise UsageError("random transforms take a CPU torch.Generator (parameters are drawn on the CPU)")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by ``padding``, then crop every image back to H x W at a random offset."""
    _check_gen(generator)
    if not isinstance(padding, int) or padding < 0:
        raise UsageError(f"padding must be a non-negative int, not {padding!r}")
    xb, single = _batch(x, "random_crop")
    n, _, h, w = xb.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    if padding == 0:
        return x
    dev = xb.device
    padded = F.pad(xb, (padding, padding, padding, padding))
    rows = _to(oy, dev)[:, None] + torch.arange(h, device=dev)  # n x h
    cols = _to(ox, dev)[:, None] + torch.arange(w, device=dev)  # n x w
    # gather rows then columns: index the padded batch per image
    idx_r = rows[:, None, :, None].expand(n, xb.shape[1], h, padded.shape[-1])
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, xb.shape[1], h, w)
    out = out.gather(3, idx_c)
    return out[0] if single else out


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    _check_gen(generator)
    xb, single = _batch(x, "random_flip")
    flip = torch.rand(xb.shape[0], generator=generator) < p
    out = torch.where(_to(flip, xb.device)[:, None, None, None], xb.flip(-1), xb)
    return out[0] if single else out


def random_erasing(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    attempts: int = 10,
) -> torch.Tensor:
    """Random erasing (Zhong et al.), as torchvision's ``RandomErasing`` but for a whole batch.

    With probability ``p`` an image gets one rectangle of area ``scale`` x H x W and aspect
    ``ratio`` (log-uniform) set to ``value``; as in torchvision up to ``attempts`` draws are made
    and the first that fits is used (none fits: the image is left alone).
    """
    _check_gen(generator)
    if not (0 <= scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]) or not 0 <= p <= 1:
        raise UsageError(f"bad random_erasing arguments: p={p}, scale={scale}, ratio={ratio}")
    xb, single = _batch(x, "random_erasing")
    n, _, h, w = xb.shape
    area = h * w
    apply = torch.rand(n, generator=generator) < p
    s = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator) * area
    logr = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    eh = torch.sqrt(s * r).round().long()
    ew = torch.sqrt(s / r).round().long()
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = fits.int().argmax(dim=1)  # first attempt that fits
    any_fit = fits.any(dim=1)
    ar = torch.arange(n)
    eh, ew = eh[ar, first], ew[ar, first]
    u = torch.rand(n, 2, generator=generator)
    top = (u[:, 0] * (h - eh + 1).clamp(min=1)).long().clamp(max=h - 1)
    left = (u[:, 1] * (w - ew + 1).clamp(min=1)).long().clamp(max=w - 1)
    active = apply & any_fit
    dev = xb.device
    top, left, eh, ew, active = (_to(t, dev) for t in (top, left, eh, ew, active))
    ry = torch.arange(h, device=dev)[None, :]
    rx = torch.arange(w, device=dev)[None, :]
    in_rows = (ry >= top[:, None]) & (ry < (top + eh)[:, None])  # n x h
    in_cols = (rx >= left[:, None]) & (rx < (left + ew)[:, None])  # n x w
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & active[:, None, None]
    out = xb.masked_fill(mask[:, None], value)
    return out[0] if single else out


class Preprocess(nn.Module):
    """Inference preprocessing: float images in [0, 1] at native size -> resize -> normalize.

    Plain ``F.interpolate`` and arithmetic, so it traces (``torch.fx``), exports (``torch.export``)
    and goes to ONNX with the default (dynamo) exporter at opset >= 18, whose ``Resize`` has the
    antialias attribute; the legacy TorchScript exporter (``dynamo=False``) cannot export the
    antialiased resize: build it with ``antialias=False`` there (it only matters when shrinking).
    :meth:`config` / :meth:`from_config` let checkpoints store and rebuild it.
    """

    def __init__(
        self,
        size: int | None,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        *,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        if size is not None:
            _hw(size)
        self.size = size
        self.antialias = antialias
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if bool((std_t == 0).any()):
            raise UsageError("std must not contain zeros")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=self.antialias
            )
        return (x - self.mean) / self.std

    def config(self) -> dict:
        return {
            "size": self.size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "antialias": self.antialias,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Preprocess":
        return cls(cfg.get("size"), cfg.get("mean", 0.0), cfg.get("std", 1.0), antialias=cfg.get("antialias", True))

    def extra_repr(self) -> str:
        return f"size={self.size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
