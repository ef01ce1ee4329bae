"""``resnetlab bench train``: training images/s of the chapter's loop and of resnetlab, same process.

Both sides train the same network from the same initial weights on the same data; every step is
timed with its data (the reference's DataLoader fetch, resnetlab's batch index and resize), after
a warm-up, alternating the two sides so that load from other processes hits both alike. Also
measured in the same run: this machine's fp32 and bf16 matmul peaks, and (``--levers``) what each
of resnetlab's levers gives on its own.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from resnetlab.bench import check_batch_fits
from resnetlab.bench.engines import LEVERS, ResnetlabTrainer, interleaved, measure_levers
from resnetlab.bench.machine import cpu_line, peaks, training_flops_per_image
from resnetlab.bench.reference import ReferenceTrainer
from resnetlab.data import Split, load_dataset
from resnetlab.device import environment
from resnetlab.errors import UsageError
from resnetlab.models import create_model


def _lever_names(text: str | None) -> list[str]:
    if not text or text == "none":
        return []
    if text == "all":
        return list(LEVERS)
    names = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in LEVERS]
    if bad:
        raise UsageError(f"unknown lever(s) {', '.join(bad)}; choose from {', '.join(LEVERS)}, all or none")
    return names


def run_train_bench(args: argparse.Namespace) -> int:
    """``resnetlab bench train``: the chapter's loop and resnetlab timed in turns, with this machine's peaks.

    Args:
        args: the parsed flags of ``resnetlab bench train`` (checked by :func:`resnetlab.bench.run_bench`).

    Returns:
        0; the figures are printed (``--json``: one JSON object on the last line).
    """
    from resnetlab.device import resolve_device

    levers = _lever_names(args.levers)
    device = resolve_device(args.device)
    block = args.block or (1 if device.type == "cpu" else 20)
    say = (lambda *_: None) if args.json else (lambda m: print(m, flush=True))
    env = environment(device)
    say(
        f"{cpu_line(env)}, {env['cores']} cores, flags {' '.join(env['cpu_flags'])}, "
        f"native bf16: {env['bf16_native']}; torch {env['torch']}; load average {env['load_average']}"
    )

    train, _ = load_dataset(args.dataset, root=args.data_root)
    c, h, _w = train.images.shape[1:]
    size = args.resize or h
    batches = (args.batch_size, args.lever_batch_size) if levers else (args.batch_size,)
    check_batch_fits(size, c, max(batches))

    pk = peaks(device, args.peak_size, args.bf16_peak_size)
    say(
        f"matmul peaks: fp32 {pk['fp32_peak_gflops']:.1f} GFLOP/s ({args.peak_size}^2), "
        f"bf16 {pk['bf16_peak_gflops']:.2f} GFLOP/s ({args.bf16_peak_size}^2): "
        f"bf16/fp32 = {pk['bf16_over_fp32_peak']:.3f}"
    )
    flops = _flops_per_image(args.model, train, size, batches)
    r, compile_seconds = _time_both_sides(args, train, device, size, block, say)

    lever_results: dict[str, Any] = {}
    if levers:
        base = {"channels_last": args.channels_last, "compile": False, "precision": "fp32", "data": "memory"}
        lever_results = measure_levers(
            train,
            levers,
            model=args.model,
            batch_size=args.lever_batch_size,
            resize=args.resize or None,
            steps=args.lever_steps,
            warmup=1,
            device=device,
            num_workers=args.workers,
            base=base,
            log=say,
        )

    result = _train_result(args, r, flops, pk, size=size, block=block, device=device, compile_seconds=compile_seconds)
    result.update({"levers": {k: v["ratio"] for k, v in lever_results.items()}, "lever_details": lever_results, **env})
    (fwd_flops, train_flops), ref_ips, our_ips = flops, r["reference"]["images_per_s"], r["resnetlab"]["images_per_s"]
    say(f"reference (chapter loop): {ref_ips:.1f} images/s ({ref_ips * train_flops / 1e9:.1f} GFLOP/s)")
    say(
        f"resnetlab:                {our_ips:.1f} images/s ({our_ips * train_flops / 1e9:.1f} GFLOP/s = "
        f"{result['fraction_of_fp32_peak']:.0%} of the fp32 peak, {result['fraction_of_bf16_peak']:.1f}x the bf16 peak)"
    )
    say(
        f"speed-up: x{result['ratio']:.2f} (median step: x{result['ratio_median_step']:.2f}); "
        f"training FLOPs per image {train_flops / 1e9:.2f} G (3 x forward would be {3 * fwd_flops / 1e9:.2f} G)"
    )
    if args.json:
        print(json.dumps(result))
    return 0


def _flops_per_image(model: str, train: Split, size: int, batches: tuple[int, ...]) -> tuple[int, int]:
    """(forward, training) FLOPs per image of ``model`` at ``size`` px, after refusing a batch it cannot train on."""
    from resnetlab.train.setup import check_train_size

    c = train.images.shape[1]
    probe = create_model(model, num_classes=len(train.classes), in_chans=c)
    for b in batches:  # as train refuses them: one line, not a traceback
        check_train_size(probe, size, c, model, b)
    return training_flops_per_image(probe, c, size, torch.device("cpu"))


def _time_both_sides(
    args: argparse.Namespace, train: Split, device: torch.device, size: int, block: int, say: Callable[[str], None]
) -> tuple[dict[str, dict[str, Any]], float]:
    """:func:`interleaved` figures of the chapter's loop and resnetlab's, and the seconds resnetlab took to compile."""
    batch, steps, warmup = args.batch_size, args.steps, args.warmup
    both = dict(model=args.model, batch_size=batch, resize=args.resize or None, seed=args.seed, device=device)
    ref = ReferenceTrainer(train, **both, num_workers=args.workers)
    ours = ResnetlabTrainer(
        train, **both, channels_last=args.channels_last, compile=args.compile, precision=args.precision
    )
    t0 = time.perf_counter()
    if args.compile:
        ours.step()  # compilation outside the timed span (reported)
    compile_seconds = time.perf_counter() - t0 if args.compile else 0.0
    say(
        f"timing {steps} steps of batch {batch} each ({args.model} at {size} px, {warmup} warm-up steps"
        f"{f', timed in runs of {block}' if block > 1 else ''}, "
        f"reference DataLoader with {args.workers} workers; resnetlab {ours.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''})"
    )
    return interleaved({"reference": ref, "resnetlab": ours}, steps, warmup, block), compile_seconds


def _train_result(
    args: argparse.Namespace,
    r: dict[str, dict[str, Any]],
    flops: tuple[int, int],
    pk: dict[str, Any],
    *,
    size: int,
    block: int,
    device: torch.device,
    compile_seconds: float,
) -> dict[str, Any]:
    """The figures of ``bench train`` (without the levers and the environment), as ``--json`` prints them."""
    from resnetlab.device import resolve_precision

    fwd_flops, train_flops = flops
    ref_ips, our_ips = r["reference"]["images_per_s"], r["resnetlab"]["images_per_s"]
    gflops, ref_gflops = our_ips * train_flops / 1e9, ref_ips * train_flops / 1e9
    return {
        "reference_images_per_s": round(ref_ips, 2),
        "resnetlab_images_per_s": round(our_ips, 2),
        "ratio": round(our_ips / ref_ips, 3),
        "ratio_median_step": round(
            r["resnetlab"]["median_step_images_per_s"] / r["reference"]["median_step_images_per_s"], 3
        ),
        "gflops_per_s": round(gflops, 2),
        "reference_gflops_per_s": round(ref_gflops, 2),
        "train_gflops_per_image": round(train_flops / 1e9, 4),
        "forward_gflops_per_image": round(fwd_flops / 1e9, 4),
        **{k: pk[k] for k in ("fp32_peak_gflops", "bf16_peak_gflops", "bf16_over_fp32_peak", "peak_sizes")},
        "fraction_of_fp32_peak": round(gflops / pk["fp32_peak_gflops"], 4),
        "fraction_of_bf16_peak": round(gflops / pk["bf16_peak_gflops"], 4),
        "reference_fraction_of_fp32_peak": round(ref_gflops / pk["fp32_peak_gflops"], 4),
        "model": args.model,
        "resize": size,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "block": block,
        "seed": args.seed,
        "reference_workers": args.workers,
        "precision": resolve_precision(args.precision, device),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_seconds": round(compile_seconds, 1),
        "step_seconds": {k: v["step_seconds"] for k, v in r.items()},
    }
