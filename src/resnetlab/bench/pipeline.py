"""``resnetlab bench pipeline``: input-pipeline throughput alone (no model): resnetlab's in-memory
batches vs the chapter's loader.

* resnetlab: ``BatchLoader`` (whole split on the device, one index per step) + ``to_float`` +
  ``resize`` to 96 (bilinear, antialiased), batches of 256, shuffled.
* reference: what the D2L chapter does, without torchvision: a ``torch.utils.data.DataLoader``
  over per-sample PIL images (the reference's ``PILDataset`` with ``chapter_transform``: PIL bilinear
  ``Resize(96)`` -> ``ToTensor``), ``shuffle=True``, ``num_workers`` worker processes (the chapter
  uses 4; the default here is 2, the number of cores of a small machine: pass ``--workers 4`` for
  the chapter's setting). As in the chapter, workers are started per epoch, so their start-up is in
  the timed span (a fresh iterator, then ``--batches`` batches).

Both sides are timed from the start of the epoch to the last batch on the device (synchronised).
Prints both rates and the ratio; ``--json`` also prints one JSON object on the last line.

    resnetlab bench pipeline --batches 20 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from resnetlab.bench.machine import cpu_line, synchronize
from resnetlab.bench.reference import PILDataset, chapter_transform
from resnetlab.data import BatchLoader, Split, load_dataset, resize, to_float
from resnetlab.device import environment


def bench_resnetlab(split: Split, device: torch.device, size: int, batch_size: int, batches: int) -> float:
    """Images/s of resnetlab's input path: ``batches`` shuffled batches, each resized to ``size`` on ``device``."""
    loader = BatchLoader(split, batch_size, shuffle=True, seed=0, drop_last=True, device=device)
    for xb, _ in loader.batches(1):  # warm-up (allocator, kernels) outside the timed epoch
        resize(to_float(xb), size)
        break
    synchronize(device)
    n = 0
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(loader.batches(0)):
        if step == batches:
            break
        x = resize(to_float(xb), size)
        n += x.shape[0]
    synchronize(device)
    return n / (time.perf_counter() - t0)


def bench_reference(
    split: Split, device: torch.device, size: int, batch_size: int, batches: int, workers: int
) -> float:
    """Images/s of the chapter's input path: a fresh DataLoader epoch over PIL-resized images, to ``device``."""
    g = torch.Generator().manual_seed(0)
    dl = torch.utils.data.DataLoader(
        PILDataset(split, chapter_transform(size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=g,
        pin_memory=device.type == "cuda",
    )
    n = 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(dl):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += x.shape[0]
        if step + 1 == batches:
            break
    synchronize(device)
    return n / (time.perf_counter() - t0)


def run_pipeline_bench(args: argparse.Namespace) -> int:
    """Print the images/s of both input paths and their ratio.

    Args:
        args: the parsed flags of ``resnetlab bench pipeline``: ``dataset``, ``data_root``, ``size``,
            ``batch_size``, ``batches``, ``workers``, ``device`` and ``json``.

    Returns:
        0.
    """
    from resnetlab.device import resolve_device

    device = resolve_device(args.device)
    env = environment(device)
    print(cpu_line(env))
    train, _ = load_dataset(args.dataset, args.data_root)
    ours = bench_resnetlab(train, device, args.size, args.batch_size, args.batches)
    ref = bench_reference(train, device, args.size, args.batch_size, args.batches, args.workers)
    print(f"resnetlab BatchLoader+to_float+resize({args.size}): {ours:,.0f} images/s")
    print(f"chapter DataLoader (PIL resize, {args.workers} workers): {ref:,.0f} images/s")
    print(
        f"speed-up: {ours / ref:.1f}x  ({args.batches} batches of {args.batch_size}, device {device}, "
        f"{env['cores']} CPUs, torch {env['torch']})"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "resnetlab_images_per_s": round(ours, 1),
                    "reference_images_per_s": round(ref, 1),
                    "ratio": round(ours / ref, 2),
                    "batches": args.batches,
                    "batch_size": args.batch_size,
                    "size": args.size,
                    "workers": args.workers,
                    "device": str(device),
                    "cpus": env["cores"],
                    "torch": env["torch"],
                    "python": env["python"],
                    "cpu_class": env["cpu_class"],
                }
            )
        )
    return 0
