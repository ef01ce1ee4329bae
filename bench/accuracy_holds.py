"""Accuracy holds: the chapter's reference loop and resnetlab's ``d2l`` recipe, same seed, same epochs,
must end within ``--tolerance`` (default 0.5 points) of test accuracy.

    python bench/accuracy_holds.py --epochs 2            # the issue's check (GPU, or about 2 h of CPU)
    python bench/accuracy_holds.py --epochs 1 --subset 1024 --resize 32 --tolerance 1   # a smoke test

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

from resnetlab.bench.reference import CHAPTER, run_reference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=0, help="train both on this seeded subset (0: all 60,000)")
    p.add_argument("--resize", type=int, default=CHAPTER["resize"])
    p.add_argument("--workers", type=int, default=CHAPTER["num_workers"], help="reference DataLoader workers")
    p.add_argument("--tolerance", type=float, default=0.5, help="allowed gap in test-accuracy points (default 0.5)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--device", default="auto")
    p.add_argument("--control", action="store_true",
                   help="also train the reference loop on resnetlab's batch order (PIL inputs) to split the gap")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from resnetlab.train import train

    say = (lambda *_: None) if a.json else print
    t0 = time.perf_counter()
    say(f"reference (chapter loop), {a.epochs} epoch(s), seed {a.seed}:")
    reference_args = dict(epochs=a.epochs, seed=a.seed, subset=a.subset, resize=a.resize or None, num_workers=a.workers,
                          dataset=a.dataset, data_root=a.data_root, device=a.device, log=lambda m: say("  " + m))  # fmt: skip
    ref = run_reference(**reference_args)
    t_ref = time.perf_counter() - t0
    control = None
    if a.control:
        say(f"control: the reference loop on resnetlab's batch order, {a.epochs} epoch(s), seed {a.seed}:")
        control = run_reference(**reference_args, resnetlab_order=True)
    say(f"resnetlab train --recipe d2l, {a.epochs} epoch(s), seed {a.seed}:")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resnetlab-acc-") as tmp:
        ours = train("d2l", out=f"{tmp}/run", epochs=a.epochs, seed=a.seed, subset=a.subset or None, resize=a.resize,
                     dataset=a.dataset, data_root=a.data_root, device=a.device, progress=False)  # fmt: skip
    t_ours = time.perf_counter() - t0
    gap = 100 * (ours.test_acc - ref["test_acc"])
    ok = abs(gap) <= a.tolerance
    say(f"test accuracy: reference {ref['test_acc']:.4f}, resnetlab {ours.test_acc:.4f}: gap {gap:+.2f} points "
        f"({'within' if ok else 'OUTSIDE'} {a.tolerance} points); wall {t_ref:.0f} s vs {t_ours:.0f} s")  # fmt: skip
    split = {}
    if control:
        split = {"control_test_acc": control["test_acc"], "control_history": control["history"],
                 "gap_from_order_points": round(100 * (control["test_acc"] - ref["test_acc"]), 3),
                 "gap_from_pixels_points": round(100 * (ours.test_acc - control["test_acc"]), 3)}  # fmt: skip
        say(f"control (reference loop, resnetlab's order) {control['test_acc']:.4f}: "
            f"{split['gap_from_order_points']:+.2f} points from the order, "
            f"{split['gap_from_pixels_points']:+.2f} from the pixels")  # fmt: skip
    if a.json:
        print(json.dumps({"reference_test_acc": ref["test_acc"], "resnetlab_test_acc": ours.test_acc,
                          "gap_points": round(gap, 3), "tolerance_points": a.tolerance, "ok": ok,
                          "epochs": a.epochs, "seed": a.seed, "subset": a.subset, "resize": a.resize,
                          "reference_seconds": round(t_ref, 1), "resnetlab_seconds": round(t_ours, 1),
                          "reference_history": ref["history"], "resnetlab_history": ours.history, **split}))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
