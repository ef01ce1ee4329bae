"""End-of-epoch test evaluation at several batch sizes, interleaved in one run.

    python bench/eval_batch.py runs/fast-20261130-210000                 # 64,128,256,1000, 4 rounds
    python bench/eval_batch.py RUN --batch-sizes 256,1000 --rounds 6 --json

Times exactly what the training loop does at each epoch end (``evaluate`` over the whole test split
with the run's ``Classifier``, flip TTA included when the run used it) and checks that every batch
size gives the same confusion matrix. Rounds go through the sizes in turn, so machine load hits all
alike; the figure per size is the median round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from resnetlab.data import BatchLoader, load_dataset
from resnetlab.train import load_checkpoint
from resnetlab.train.loop import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a resnetlab run directory or its last.safetensors")
    p.add_argument("--batch-sizes", default="64,128,256,1000", help="comma list (default 64,128,256,1000)")
    p.add_argument("--rounds", type=int, default=4, help="timed passes over the test split per size (default 4)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = p.parse_args()
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    classifier = load_checkpoint(a.run)
    _, test = load_dataset(classifier.meta["dataset"], root=classifier.meta.get("data_root"))
    num_classes = len(test.classes)
    seconds: dict[int, list[float]] = {bs: [] for bs in sizes}
    reference = evaluate(classifier, BatchLoader(test, sizes[0]), num_classes)  # also the warm-up
    for _ in range(a.rounds):
        for bs in sizes:
            t0 = time.perf_counter()
            confusion = evaluate(classifier, BatchLoader(test, bs), num_classes)
            seconds[bs].append(time.perf_counter() - t0)
            if not confusion.equal(reference):
                raise SystemExit(f"batch size {bs} changed the predictions; the comparison is void")
    median = {bs: statistics.median(s) for bs, s in seconds.items()}
    slowest = max(median.values())
    for bs in sizes:
        print(f"batch {bs:>5}: {median[bs]:.2f} s per evaluation (median of {a.rounds}), "
              f"{len(test) / median[bs]:.0f} test images/s, x{slowest / median[bs]:.2f} over the slowest")  # fmt: skip
    if a.json:
        print(json.dumps({"run": a.run, "tta": classifier.tta, "test_images": len(test),
                          "seconds": {str(bs): [round(x, 3) for x in s] for bs, s in seconds.items()},
                          "median_seconds": {str(bs): round(m, 3) for bs, m in median.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
