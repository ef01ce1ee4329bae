"""``resnetlab bench eval-batch``: end-of-epoch test evaluation at several batch sizes, interleaved in one run.

    resnetlab bench eval-batch runs/fast-20261130-210000                 # 64,128,256,1000, 4 rounds
    resnetlab bench eval-batch RUN --batch-sizes 256,1000 --rounds 6 --json

Times exactly what the training loop does at each epoch end (``evaluate`` over the whole test split
with the run's ``Classifier``, flip TTA included when the run used it) and checks that every batch
size gives the same confusion matrix. Rounds go through the sizes in turn, so machine load hits all
alike; the figure per size is the median round.
"""

from __future__ import annotations

import argparse
import json
import statistics

from resnetlab.bench.machine import cpu_line, round_robin
from resnetlab.data import BatchLoader, load_dataset
from resnetlab.device import cpu_info
from resnetlab.errors import UsageError
from resnetlab.train import load_checkpoint
from resnetlab.train.evaluate import evaluate


def run_eval_batch_bench(args: argparse.Namespace) -> int:
    """Print, per test batch size, the median seconds of one evaluation of the test split.

    Args:
        args: the parsed flags of ``resnetlab bench eval-batch``: ``run`` (a run directory or its
            ``last.safetensors``), ``batch_sizes`` (a comma list), ``rounds`` and ``json``.

    Returns:
        0.
    """
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes takes a comma list of ints, not {args.batch_sizes!r}") from None
    if min(sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive ints, not {args.batch_sizes!r}")
    info = cpu_info()
    print(cpu_line(info))
    classifier = load_checkpoint(args.run)
    _, test = load_dataset(classifier.meta["dataset"], root=classifier.meta.get("data_root"))
    num_classes = len(test.classes)
    reference = evaluate(classifier, BatchLoader(test, sizes[0]), num_classes)  # also the warm-up

    def evaluate_at(bs: int) -> None:
        if not evaluate(classifier, BatchLoader(test, bs), num_classes).equal(reference):
            raise SystemExit(f"batch size {bs} changed the predictions; the comparison is void")

    seconds = round_robin({bs: (lambda bs=bs: evaluate_at(bs)) for bs in sizes}, args.rounds)
    median = {bs: statistics.median(s) for bs, s in seconds.items()}
    slowest = max(median.values())
    for bs in sizes:
        print(
            f"batch {bs:>5}: {median[bs]:.2f} s per evaluation (median of {args.rounds}), "
            f"{len(test) / median[bs]:.0f} test images/s, x{slowest / median[bs]:.2f} over the slowest"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "run": args.run,
                    "tta": classifier.tta,
                    "test_images": len(test),
                    "seconds": {str(bs): [round(x, 3) for x in s] for bs, s in seconds.items()},
                    "median_seconds": {str(bs): round(m, 3) for bs, m in median.items()},
                    "cpu_class": info["cpu_class"],
                }
            )
        )
    return 0
