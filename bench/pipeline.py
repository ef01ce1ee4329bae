"""Input-pipeline throughput alone (no model): resnetlab's in-memory batches vs the chapter's loader.

* resnetlab: ``BatchLoader`` (whole split on the device, one index per step) + ``to_float`` +
  ``resize`` to 96 (bilinear, antialiased), batches of 256, shuffled.
* reference: what the D2L chapter does, without torchvision: a ``torch.utils.data.DataLoader``
  over per-sample PIL images (``Image.fromarray`` -> ``resize((96, 96), BILINEAR)`` -> ToTensor,
  i.e. ``np.asarray / 255``), ``shuffle=True``, ``num_workers`` worker processes (the chapter uses
  4; the default here is 2, the number of cores of a small machine: pass ``--workers 4`` for the
  chapter's setting). As in the chapter, workers are started per epoch, so their start-up is in
  the timed span (a fresh iterator, then ``--batches`` batches).

Both sides are timed from the start of the epoch to the last batch on the device (synchronised).
Prints both rates and the ratio; ``--json`` also prints one JSON object on the last line.

    python bench/pipeline.py --batches 20 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

from resnetlab.data import BatchLoader, load_dataset, resize, to_float


class ChapterDataset(torch.utils.data.Dataset):
    """Per-sample PIL pipeline: uint8 28x28 -> PIL 'L' -> Resize(size) bilinear -> ToTensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int) -> None:
        self.images = images.numpy()
        self.labels = labels
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i, 0])  # 2-d uint8: mode L
        img = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return x, int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_resnetlab(split, device: torch.device, size: int, batch_size: int, batches: int) -> float:
    loader = BatchLoader(split, batch_size, shuffle=True, seed=0, drop_last=True, device=device)
    for xb, _ in loader.batches(1):  # warm-up (allocator, kernels) outside the timed epoch
        resize(to_float(xb), size)
        break
    _sync(device)
    n = 0
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(loader.batches(0)):
        if step == batches:
            break
        x = resize(to_float(xb), size)
        n += x.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def bench_reference(split, device: torch.device, size: int, batch_size: int, batches: int, workers: int) -> float:
    ds = ChapterDataset(split.images, split.labels, size)
    g = torch.Generator().manual_seed(0)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g,
                                     pin_memory=device.type == "cuda")  # fmt: skip
    n = 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(dl):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += x.shape[0]
        if step + 1 == batches:
            break
    _sync(device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (chapter: 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    train, _ = load_dataset(a.dataset, a.data_root)
    ours = bench_resnetlab(train, device, a.size, a.batch_size, a.batches)
    ref = bench_reference(train, device, a.size, a.batch_size, a.batches, a.workers)
    print(f"resnetlab BatchLoader+to_float+resize({a.size}): {ours:,.0f} images/s")
    print(f"chapter DataLoader (PIL resize, {a.workers} workers): {ref:,.0f} images/s")
    print(f"speed-up: {ours / ref:.1f}x  ({a.batches} batches of {a.batch_size}, device {device}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__})")  # fmt: skip
    if a.json:
        print(json.dumps({
            "resnetlab_images_per_s": round(ours, 1), "reference_images_per_s": round(ref, 1),
            "ratio": round(ours / ref, 2), "batches": a.batches, "batch_size": a.batch_size, "size": a.size,
            "workers": a.workers, "device": str(device), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
