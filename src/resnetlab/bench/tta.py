"""``resnetlab bench time-to-accuracy``: wall-clock from process start to a test accuracy.

For each seed, ``python -m resnetlab train --recipe RECIPE --seed S --out TMP --force [extra]`` runs
as a child process. Its stdout is a pipe, so it prints one line per epoch (``epoch E/N: ...,
test acc A, ...``); each line is timestamped as it arrives, relative to just before the process
was started, so the figure includes Python's start-up, imports, data loading and evaluation. A
crossing is seen only after an epoch the run tests (``test acc not measured`` otherwise): add
``--eval-every 1`` to the train args of a recipe that tests less often, such as ``fast``, to find
the first epoch at the target. The
exact accuracy of the epoch is read from the run directory's ``metrics.jsonl`` (written before the
line is printed); the printed, rounded one is the fallback.

Two clocks per crossing: ``seconds``, the wall-clock from process start (the CPU target: a whole
run), and ``train_seconds``, the training time summed over the epochs up to the crossing as the run
itself records it (``seconds`` in ``metrics.jsonl``: the epochs' steps with their data, without
start-up, evaluation and writing; the GPU target's "seconds of training").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resnetlab.errors import ResnetlabError, UsageError

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): .*?test acc (?:([0-9.]+)|not measured)")  # not measured: --eval-every


class TrainFailed(ResnetlabError):
    """The training child process exited with an error."""


def _epoch_record(run_dir: Path, epoch: int) -> tuple[float | None, float | None]:
    """(exact test accuracy or None where not measured, training seconds summed over epochs 1..epoch).

    Both are read from ``metrics.jsonl``.
    """
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r.get("kind") == "epoch"]  # not the curve's rows within epochs
        row = next(r for r in rows if r.get("epoch") == epoch)
        acc = None if row["test_acc"] is None else float(row["test_acc"])
        return acc, sum(float(r["seconds"]) for r in rows if r["epoch"] <= epoch)
    except (OSError, ValueError, TypeError, KeyError, StopIteration):
        return None, None


def time_one_seed(
    recipe: str, seed: int, target: float, extra: list[str], device: str | None, say: Any = None
) -> dict[str, Any]:
    """Run one training process; return when and where it reached ``target`` and its total time."""
    with tempfile.TemporaryDirectory(prefix="resnetlab-tta-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "resnetlab",
            "train",
            "--recipe",
            recipe,
            "--seed",
            str(seed),
            "--out",
            str(run_dir),
            "--force",
            *(["--device", device] if device else []),
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        err_path = Path(tmp) / "stderr.txt"
        epochs: list[dict[str, Any]] = []
        crossed: dict[str, Any] | None = None
        with open(err_path, "w") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                t = time.perf_counter() - t0
                m = EPOCH_LINE.match(line.strip())
                if not m:
                    continue
                epoch = int(m.group(1))
                acc, train_seconds = _epoch_record(run_dir, epoch)
                acc = acc if acc is not None or m.group(3) is None else float(m.group(3))
                row = {
                    "epoch": epoch,
                    "of": int(m.group(2)),
                    "test_acc": acc,
                    "seconds": round(t, 2),
                    "train_seconds": None if train_seconds is None else round(train_seconds, 2),
                }
                epochs.append(row)
                if say:
                    say(f"  seed {seed}: {t:7.1f} s  {line.strip()}")
                if crossed is None and acc is not None and acc >= target:
                    crossed = row
            rc = proc.wait()
            total = time.perf_counter() - t0
        if rc != 0:
            tail = err_path.read_text().strip().splitlines()[-5:]
            raise TrainFailed(f"`{shlex.join(cmd)}` exited with status {rc}: " + " | ".join(tail))
        if not epochs:
            raise TrainFailed(f"`{shlex.join(cmd)}` printed no epoch lines")
    return {
        "seed": seed,
        "reached": crossed is not None,
        "seconds": crossed["seconds"] if crossed else None,
        "train_seconds": crossed["train_seconds"] if crossed else None,
        "epoch": crossed["epoch"] if crossed else None,
        "accuracy": crossed["test_acc"] if crossed else epochs[-1]["test_acc"],
        "final_accuracy": epochs[-1]["test_acc"],
        "epochs_run": len(epochs),
        "total_seconds": round(total, 2),
        "history": epochs,
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median with "not reached" counted as infinitely slow: None when half or more did not reach."""
    ranked = sorted(float("inf") if v is None else v for v in values)
    if not ranked:
        return None
    m = statistics.median(ranked)
    return None if m == float("inf") else round(m, 2)


def run_tta_bench(args: argparse.Namespace) -> int:
    """``resnetlab bench time-to-accuracy``: time one training process per seed to ``--target``.

    Args:
        args: the parsed flags of ``resnetlab bench time-to-accuracy``.

    Returns:
        0; the figures are printed (``--json``: one JSON object on the last line).
    """
    from resnetlab.bench.machine import cpu_line
    from resnetlab.device import cpu_info

    if not 0 < args.target <= 1:
        raise UsageError(f"--target is an accuracy in (0, 1], not {args.target}")
    try:
        extra = shlex.split(args.train_args or "")
    except ValueError as err:  # "No closing quotation", "No escaped character"
        raise UsageError(f"--train-args: {err}") from None
    for flag in ("--recipe", "--seed", "--out", "--force", "--resume", "--nproc"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise UsageError(f"--train-args may not set {flag}: the benchmark sets it")
    device = None if args.device == "auto" else args.device
    say = (lambda *_: None) if args.json else (lambda m: print(m, flush=True))
    info = cpu_info()
    say(cpu_line(info))
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        say(f"seed {seed}: resnetlab train --recipe {args.recipe} --seed {seed} {shlex.join(extra)}".rstrip())
        r = time_one_seed(args.recipe, seed, args.target, extra, device, say)
        runs.append(r)
        if r["reached"]:
            trained = f", {r['train_seconds']:.1f} s of it training" if r["train_seconds"] is not None else ""
            say(
                f"seed {seed}: {r['seconds']:.1f} s to test acc {r['accuracy']:.4f} >= {args.target} "
                f"at epoch {r['epoch']}"
                f"{trained} (process total {r['total_seconds']:.1f} s)"
            )
        else:
            say(
                f"seed {seed}: not reached (final test acc {r['final_accuracy']:.4f} < {args.target}; "
                f"process total {r['total_seconds']:.1f} s)"
            )
    med = median_or_none([r["seconds"] for r in runs])
    med_train = median_or_none([r["train_seconds"] if r["reached"] else None for r in runs])
    say(
        f"median time to {args.target}: "
        + (f"{med:.1f} s ({med_train} s of training)" if med is not None else "not reached by most seeds")
        + f" over {len(runs)} seed(s); median process total {statistics.median(r['total_seconds'] for r in runs):.1f} s"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "recipe": args.recipe,
                    "target": args.target,
                    "seeds": [r["seed"] for r in runs],
                    "seconds": [r["seconds"] for r in runs],
                    "median_seconds": med,
                    "train_seconds": [r["train_seconds"] for r in runs],
                    "median_train_seconds": med_train,
                    "epochs": [r["epoch"] for r in runs],
                    "accuracies": [r["accuracy"] for r in runs],
                    "reached": [r["reached"] for r in runs],
                    "final_accuracies": [r["final_accuracy"] for r in runs],
                    "total_seconds": [r["total_seconds"] for r in runs],
                    "median_total_seconds": round(statistics.median(r["total_seconds"] for r in runs), 2),
                    "train_args": extra,
                    "device": args.device,
                    "cpu": info["cpu"],
                    "cores": info["cores"],
                    "cpu_class": info["cpu_class"],
                    "runs": runs,
                }
            )
        )
    return 0
