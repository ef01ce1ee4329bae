"""Benchmarks: every one is a module here, run as ``resnetlab bench NAME`` (see ``resnetlab bench --help``).

Against the D2L chapter's reference loop:

* ``train`` (:mod:`~resnetlab.bench.train_bench`): training images/s, the chapter's loop vs resnetlab;
* ``infer`` (:mod:`~resnetlab.bench.infer`): eval images/s and latency;
* ``time-to-accuracy`` (:mod:`~resnetlab.bench.tta`): wall-clock to a test accuracy;
* ``pipeline`` (:mod:`~resnetlab.bench.pipeline`): the input pipeline alone;
* ``accuracy-holds`` (:mod:`~resnetlab.bench.accuracy_holds`): same seed, same epochs, same accuracy?
* ``reference`` (:mod:`~resnetlab.bench.reference`): the chapter's data pipeline and ``train_ch6``, reproduced.

Of resnetlab's own choices:

* ``fast-step`` (:mod:`~resnetlab.bench.fast_step`): a recipe's step, eager vs ``torch.compile``;
* ``conv-backward`` (:mod:`~resnetlab.bench.conv_backward`): a recipe's convolutions, forward vs backward;
* ``eval-batch`` (:mod:`~resnetlab.bench.eval_batch`): a run's test pass at several batch sizes;
* ``strided-projection`` (:mod:`~resnetlab.bench.strided_projection`): sliced vs strided 1x1 shortcuts.

Shared pieces: :mod:`resnetlab.bench.engines` (resnetlab's loop one step at a time, levers as
switches, interleaved timing) and :mod:`resnetlab.bench.machine` (CPU model, class and flags, fp32 /
bf16 matmul peaks, FLOPs per image, round-robin timing). Every command prints the CPU class it ran
on; most print their figures as one JSON object on the last line with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import os

_COMMANDS = {
    "train": "resnetlab.bench.train_bench:run_train_bench",
    "time-to-accuracy": "resnetlab.bench.tta:run_tta_bench",
    "infer": "resnetlab.bench.infer:run_infer_bench",
    "pipeline": "resnetlab.bench.pipeline:run_pipeline_bench",
    "accuracy-holds": "resnetlab.bench.accuracy_holds:run_accuracy_holds_bench",
    "reference": "resnetlab.bench.reference:run_reference_bench",
    "fast-step": "resnetlab.bench.fast_step:run_fast_step_bench",
    "conv-backward": "resnetlab.bench.conv_backward:run_conv_backward_bench",
    "eval-batch": "resnetlab.bench.eval_batch:run_eval_batch_bench",
    "strided-projection": "resnetlab.bench.strided_projection:run_strided_projection_bench",
}


# The integer flags of the bench commands and their least values (a peak matmul of side 0 divides
# by zero, a negative side cannot be built; --resize 0 keeps the native size).
_LEAST = {
    "steps": 1,
    "batch_size": 1,
    "block": 1,
    "warmup": 0,
    "workers": 0,
    "lever_batch_size": 1,
    "lever_steps": 1,
    "reps": 1,
    "small_reps": 1,
    "seeds": 1,
    "resize": 0,
    "peak_size": 1,
    "bf16_peak_size": 1,
    "threads": 1,
    "rounds": 1,
    "batches": 1,
    "size": 1,
    "epochs": 1,
    "subset": 0,
}


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``resnetlab bench``: check the flags, dispatch on ``args.bench``."""
    from resnetlab.errors import UsageError
    from resnetlab.train.recipes import MAX_SEED, MIN_SEED

    for name, least in _LEAST.items():
        value = getattr(args, name, None)  # None: not a flag of this command, or --block left to the device
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, not {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be in torch's range [-2**63, 2**64 - 1], not {seed}")
    most = 4 * (
        os.cpu_count() or 1
    )  # threads, or worker processes with a copy of torch each (~350 MB): more cannot help
    threads = getattr(args, "threads", None)
    if threads is not None and threads > most:
        raise UsageError(f"--threads {threads} is more than 4 per CPU ({os.cpu_count()} here); use at most {most}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers > most:
        raise UsageError(
            f"--workers {workers} would start {workers} processes on {os.cpu_count()} CPUs; use at most {most} "
            "(the chapter uses 4)"
        )
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    module, _, func = _COMMANDS[args.bench].partition(":")
    return int(getattr(importlib.import_module(module), func)(args) or 0)


def check_batch_fits(side: int, channels: int, batch: int) -> None:
    """Refuse a ``--resize`` whose batch of float images alone exceeds the machine's memory.

    torch refuses one such tensor itself (one line, from the CLI), but the chapter's reference
    pipeline resizes with PIL, which allocates an image in blocks: a side of 300,000 filled this
    machine's memory before anything failed.
    """
    from resnetlab.errors import UsageError

    need = batch * channels * side * side * 4
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows): torch's own refusal remains
        return
    if need > memory:
        raise UsageError(
            f"--resize {side} makes a batch of {batch} image(s) {need / 2**30:,.1f} GiB as floats, more than "
            f"this machine's {memory / 2**30:,.1f} GiB of memory; choose a smaller --resize or batch"
        )


__all__ = ["check_batch_fits", "run_bench"]
