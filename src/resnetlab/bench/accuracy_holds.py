"""``resnetlab bench accuracy-holds``: the chapter's reference loop and resnetlab's ``d2l`` recipe,
same seed, same epochs, must end within ``--tolerance`` (default 0.5 points) of test accuracy.

    resnetlab bench accuracy-holds --epochs 2            # the issue's check (GPU, or about 2 h of CPU)
    resnetlab bench accuracy-holds --epochs 1 --subset 1024 --resize 32 --tolerance 1   # a smoke test

Both start from the same weights (``torch.manual_seed(seed)`` then Xavier init) and train on the
same (seeded) subset; they differ in the shuffle order and the data pipeline (PIL per image, rounded
to uint8, vs batched float resize on the device); given the same input batches their training
steps are bit-identical (``tests/test_bench.py``). ``--control`` adds a third run, the reference
loop on resnetlab's batch order, which splits the gap into the part due to the order and the part
due to the pixels. Exit status 0 when the accuracies agree, 1 otherwise; with ``--json`` the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

from resnetlab.bench.machine import cpu_line
from resnetlab.bench.reference import CHAPTER, run_reference
from resnetlab.device import cpu_info


def run_accuracy_holds_bench(args: argparse.Namespace) -> int:
    """Train the chapter's way and resnetlab's ``d2l`` way, and compare their test accuracies.

    Args:
        args: the parsed flags of ``resnetlab bench accuracy-holds``: ``epochs``, ``seed``, ``subset``,
            ``resize`` and ``workers`` (None: the chapter's), ``tolerance``, ``dataset``, ``data_root``,
            ``device``, ``control`` and ``json``.

    Returns:
        0 when the accuracies are within ``tolerance`` points, 1 otherwise.
    """
    resize = CHAPTER["resize"] if args.resize is None else args.resize
    workers = CHAPTER["num_workers"] if args.workers is None else args.workers
    say = (lambda *_: None) if args.json else print
    info = cpu_info()
    say(cpu_line(info))
    t0 = time.perf_counter()
    say(f"reference (chapter loop), {args.epochs} epoch(s), seed {args.seed}:")
    reference_args = dict(
        epochs=args.epochs,
        seed=args.seed,
        subset=args.subset,
        resize=resize or None,
        num_workers=workers,
        dataset=args.dataset,
        data_root=args.data_root,
        device=args.device,
        log=lambda m: say("  " + m),
    )
    ref = run_reference(**reference_args)
    t_ref = time.perf_counter() - t0
    control = None
    if args.control:
        say(f"control: the reference loop on resnetlab's batch order, {args.epochs} epoch(s), seed {args.seed}:")
        control = run_reference(**reference_args, resnetlab_order=True)
    say(f"resnetlab train --recipe d2l, {args.epochs} epoch(s), seed {args.seed}:")
    t0 = time.perf_counter()
    ours = _train_d2l(args, resize)
    t_ours = time.perf_counter() - t0
    gap = 100 * (ours.test_acc - ref["test_acc"])
    ok = abs(gap) <= args.tolerance
    say(
        f"test accuracy: reference {ref['test_acc']:.4f}, resnetlab {ours.test_acc:.4f}: gap {gap:+.2f} points "
        f"({'within' if ok else 'OUTSIDE'} {args.tolerance} points); wall {t_ref:.0f} s vs {t_ours:.0f} s"
    )
    split = _split_the_gap(control, ref["test_acc"], ours.test_acc, say) if control else {}
    if args.json:
        print(
            json.dumps(
                {
                    "reference_test_acc": ref["test_acc"],
                    "resnetlab_test_acc": ours.test_acc,
                    "gap_points": round(gap, 3),
                    "tolerance_points": args.tolerance,
                    "ok": ok,
                    "epochs": args.epochs,
                    "seed": args.seed,
                    "subset": args.subset,
                    "resize": resize,
                    "reference_seconds": round(t_ref, 1),
                    "resnetlab_seconds": round(t_ours, 1),
                    "reference_history": ref["history"],
                    "resnetlab_history": ours.history,
                    **split,
                    "cpu_class": info["cpu_class"],
                }
            )
        )
    return 0 if ok else 1


def _train_d2l(args: argparse.Namespace, resize: int) -> Any:
    """resnetlab's ``d2l`` recipe with the comparison's settings, in a throw-away run directory."""
    from resnetlab.train import train

    with tempfile.TemporaryDirectory(prefix="resnetlab-acc-") as tmp:
        return train(
            "d2l",
            out=f"{tmp}/run",
            epochs=args.epochs,
            seed=args.seed,
            subset=args.subset or None,
            resize=resize,
            dataset=args.dataset,
            data_root=args.data_root,
            device=args.device,
            progress=False,
        )


def _split_the_gap(control: dict[str, Any], ref_acc: float, our_acc: float, say: Any) -> dict[str, Any]:
    """The control run's figures: how much of the gap comes from the batch order, how much from the pixels."""
    split = {
        "control_test_acc": control["test_acc"],
        "control_history": control["history"],
        "gap_from_order_points": round(100 * (control["test_acc"] - ref_acc), 3),
        "gap_from_pixels_points": round(100 * (our_acc - control["test_acc"]), 3),
    }
    say(
        f"control (reference loop, resnetlab's order) {control['test_acc']:.4f}: "
        f"{split['gap_from_order_points']:+.2f} points from the order, "
        f"{split['gap_from_pixels_points']:+.2f} from the pixels"
    )
    return split
