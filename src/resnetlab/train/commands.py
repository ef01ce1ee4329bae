"""Handlers of ``resnetlab train`` and ``resnetlab eval`` (argparse Namespace in, exit code out)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from resnetlab.errors import UsageError
from resnetlab.train.recipes import Recipe

# Every Recipe field but its name is a `train` flag of the same name (tests/test_recipes.py checks the
# parser has them all); flags whose value is None leave the recipe's value in place.
RECIPE_FLAGS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name")


def run_train(args: argparse.Namespace) -> int:
    # not `if args.nproc`: --nproc 0 must be refused, not run as one process. A worker torchrun
    # started (RANK is set) trains: however --nproc was spelled (argparse takes --npr), it must never
    # launch torchrun again.
    from resnetlab.train.loop import train
    from resnetlab.train.request import check_train_request

    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS}
    request = dict(
        out=args.out,
        resume=args.resume,
        force=args.force,
        checkpoint_every=args.checkpoint_every or 0,
        init_from=args.init_from,
        **overrides,
    )
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, not {args.nproc}")
        check_train_request(args.recipe, world_size=args.nproc, **request)
        return _launch_torchrun(args.nproc)
    bound_glibc_heap()
    train(args.recipe, data_root=args.data_root, **request)
    return 0


# glibc malloc: allocations of 8 MiB and more always come from mmap, and the heap top is trimmed
# only past 128 MiB. By default glibc raises its mmap threshold to 32 MiB after the first large
# free, so every 8-32 MiB activation then lands on the heap, fragments it and stays resident; the
# fixed mmap threshold keeps them off the heap. Both are set because a fixed mmap threshold alone
# also pins the trim threshold at 128 KiB, and the heap top is then returned and re-faulted every
# step; a lower mmap threshold costs speed. Peak memory and speed measured with and without them,
# with commands and machine: docs/performance.md.
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 128 << 20


def bound_glibc_heap() -> bool:
    """Set glibc's mmap and trim thresholds for this process (the CLI owns it; the Python API does not).

    Does nothing where libc is not glibc, or where the user set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` themselves. Returns whether the thresholds were set.
    """
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_trim_threshold, TRIM_THRESHOLD)) and bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD))


def _launch_torchrun(nproc: int) -> int:
    """``--nproc N``: re-run this command under torchrun with N processes on this machine.

    torchrun runs in this process (``torch.distributed.run``, as ``python -m torch.distributed.run
    --standalone --nproc-per-node=N -m resnetlab ...`` would), so that the exit status is the first
    failed worker's own (2 for a usage error, 130 for Ctrl-C, 128+N for a signal), not torchrun's 1.
    """
    argv = sys.argv[1:]
    rest, skip = [], False
    for i, a in enumerate(argv):  # drop --nproc N / --nproc=N, keep everything else as given
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun logs how it stops the other workers after one fails ("Sending process N closing
    # signal SIGTERM", "failed (exitcode: 2) local_rank: 0 ..."): the failed worker printed its
    # own error already; only a worker killed by a signal, which printed nothing, is reported below.
    # torch's get_logger gives each of its loggers its own level, so the parent's level is not enough.
    for name in ["torch.distributed", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "resnetlab", *rest]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode < 0:  # a negative exit code is -signal
            print(f"resnetlab: error: process {rank} of {nproc} was killed by {failure.signal_name()}", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode or 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from resnetlab.data import BatchLoader, load_dataset
    from resnetlab.device import resolve_device, resolve_precision, warn_if_emulated
    from resnetlab.inference import load_checkpoint
    from resnetlab.train.evaluate import accuracy, evaluate, require_test_images

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device, inference=True)
    warn_if_emulated(precision, device)
    classifier = load_checkpoint(args.checkpoint, device=device, precision=precision)
    meta = classifier.meta
    dataset = args.dataset or meta["dataset"]
    _, test = load_dataset(dataset, root=args.data_root or meta.get("data_root"))
    require_test_images(test, dataset)
    if list(test.images.shape[1:]) != list(meta["input_shape"]):
        raise UsageError(
            f"{dataset} images are {tuple(test.images.shape[1:])} but the model takes {tuple(meta['input_shape'])}"
        )
    if test.classes != classifier.classes:
        if len(test.classes) != len(classifier.classes):
            differ = f"{dataset} has {len(test.classes)} classes but the model was trained on {len(classifier.classes)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(test.classes, classifier.classes)) if a != b)
            differ = f"{dataset}'s class {i} is {test.classes[i]!r} but the model's is {classifier.classes[i]!r}"
        raise UsageError(f"{differ}; evaluate on the dataset it was trained on ({meta['dataset']})")
    batch = args.batch_size if args.batch_size is not None else meta.get("eval_batch_size", 500)
    confusion = evaluate(classifier, BatchLoader(test, batch, device=device), len(test.classes))
    total = confusion.sum().item()
    per_class = (confusion.diag().double() / confusion.sum(1).clamp_min(1)).tolist()
    result = {
        "checkpoint": str(args.checkpoint),
        "dataset": dataset,
        "images": total,
        "accuracy": accuracy(confusion),
        "per_class_accuracy": dict(zip(test.classes, per_class)),
        "confusion": confusion.tolist(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"accuracy {result['accuracy']:.4f} on {total} {dataset} test images")
    width = max(len(c) for c in test.classes)
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("confusion matrix (rows: true, columns: predicted):")
    cell = max(len(str(int(confusion.max()))), 3)
    for name, row in zip(test.classes, confusion.tolist()):
        print(f"  {name:<{width}} " + " ".join(f"{v:>{cell}}" for v in row))
    return 0
