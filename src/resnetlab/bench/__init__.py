"""Benchmarks against the D2L chapter's reference loop (``resnetlab bench train|time-to-accuracy|infer``).

* :mod:`resnetlab.bench.reference`: the chapter's data pipeline and ``train_ch6``, reproduced.
* :mod:`resnetlab.bench.engines`: resnetlab's loop one step at a time, levers as switches,
  interleaved timing.
* :mod:`resnetlab.bench.machine`: CPU model and flags, fp32 / bf16 matmul peaks, FLOPs per image.

Every command prints its figures as one JSON object on the last line with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib

_COMMANDS = {
    "train": "resnetlab.bench.train_bench:run_train_bench",
    "time-to-accuracy": "resnetlab.bench.tta:run_tta_bench",
    "infer": "resnetlab.bench.infer:run_infer_bench",
}


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``resnetlab bench``: dispatch on ``args.bench``."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        import torch

        from resnetlab.errors import UsageError

        if threads < 1:
            raise UsageError(f"--threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
    module, _, func = _COMMANDS[args.bench].partition(":")
    return int(getattr(importlib.import_module(module), func)(args) or 0)


__all__ = ["run_bench"]
