"""``resnetlab bench infer``: eval-mode images/s and per-image latency at batch 1 and 256.

Input is real test images as uint8 at their native size; each variant does everything between
those bytes and the logits, in eval mode under ``torch.no_grad()``:

* ``reference``: the chapter's way: per-image PIL ``Resize`` + ``ToTensor``, stacked, the network
  in NCHW fp32 (``d2l.evaluate_accuracy_gpu``'s forward);
* ``nchw``: resnetlab's ``Classifier`` (batched resize inside the model), default memory format;
* ``channels_last``: the same in NHWC;
* ``channels_last_bn_folded``: NHWC with every BatchNorm folded into the convolution before it
  (``torch.fx.experimental.optimization.fuse``: same outputs, fewer passes over the activations);
* ``compiled`` (``--compile``): ``torch.compile`` of the folded NHWC network;
* ``channels_last_bn_folded_1thread`` (when torch uses several threads): the folded network with
  one intra-op thread, a lever of the machine rather than of resnetlab (``one_thread_ratio``): on
  cores shared with other jobs, OpenMP threads that wait for each other can cost 10x at batch 1.
  It is never picked as resnetlab's figure.

Variants are timed round-robin (one call of each per round) so that machine load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

from resnetlab.bench import check_batch_fits
from resnetlab.bench.machine import cpu_line, num_threads, peaks, round_robin
from resnetlab.bench.reference import chapter_transform, init_weights
from resnetlab.data import Preprocess, Split, load_dataset, to_float
from resnetlab.device import environment
from resnetlab.errors import UsageError
from resnetlab.inference import Classifier
from resnetlab.models import count_macs, create_model, fold_batchnorm

Variant = Callable[[torch.Tensor], torch.Tensor]  # uint8 test images -> logits


def run_infer_bench(args: argparse.Namespace) -> int:
    """``resnetlab bench infer``: every inference variant on the same test images, round-robin.

    Args:
        args: the parsed flags of ``resnetlab bench infer`` (checked by :func:`resnetlab.bench.run_bench`).

    Returns:
        0; the figures are printed (``--json``: one JSON object on the last line).
    """
    from resnetlab.device import resolve_device

    device = resolve_device(args.device)
    batch_sizes = _batch_sizes(args.batch_sizes)
    say = (lambda *_: None) if args.json else (lambda m: print(m, flush=True))
    env = environment(device)
    say(cpu_line(env))
    _, test = load_dataset(args.dataset, root=args.data_root)
    c, h, _w = test.images.shape[1:]
    size = args.resize or h
    check_batch_fits(size, c, max(batch_sizes))
    pk = peaks(device, args.peak_size, args.bf16_peak_size)
    variants, macs = _variants(args, test, device)
    with torch.no_grad():
        compile_seconds = _check_variants_agree(variants, test.images[:4])
        results = _time_variants(variants, test, batch_sizes, args, device)
    best, result = _infer_result(args, results, batch_sizes, size, macs, pk)
    result.update(
        {
            "variants": results,
            "forward_gflops_per_image": round(2 * macs / 1e9, 4),
            "compile_seconds": compile_seconds,
            **{k: pk[k] for k in ("fp32_peak_gflops", "bf16_peak_gflops")},
            **env,
        }
    )
    for bs in batch_sizes:
        say(f"batch {bs}:")
        for name in variants:
            r = results[name][str(bs)]
            say(f"  {name:<24} {r['images_per_s']:>9.1f} images/s  {r['latency_ms_per_image']:>9.2f} ms/image")
        say(f"  resnetlab ({best[bs]}) vs reference: x{result[f'batch{bs}']['ratio']:.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


def _batch_sizes(text: str) -> list[int]:
    """``--batch-sizes`` as a list of positive ints."""
    try:
        batch_sizes = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes takes a comma list of ints, not {text!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive ints, not {text!r}")
    return batch_sizes


def _variants(args: argparse.Namespace, test: Split, device: torch.device) -> tuple[dict[str, Variant], int]:
    """The inference variants (uint8 images -> logits) of one network, and its multiply-adds per image."""
    from PIL import Image

    c, h, _w = test.images.shape[1:]
    torch.manual_seed(0)
    net = create_model(args.model, num_classes=len(test.classes), in_chans=c)
    net.apply(init_weights)
    net.eval().to(device)
    macs = count_macs(net, (1, c, args.resize or h, args.resize or h))
    pre = Preprocess(args.resize or None).to(device)
    trans = chapter_transform(args.resize or None)

    def reference(images: torch.Tensor) -> torch.Tensor:
        arrays = images.numpy()
        xs = [trans(Image.fromarray(a[0]) if c == 1 else Image.fromarray(a.transpose(1, 2, 0))) for a in arrays]
        return net(torch.stack(xs).to(device))

    nchw = Classifier(net, pre, test.classes).eval()
    net_cl = create_model(args.model, num_classes=len(test.classes), in_chans=c)
    net_cl.load_state_dict(net.state_dict())
    net_cl.eval().to(device).to(memory_format=torch.channels_last)
    cl = Classifier(net_cl, pre, test.classes, channels_last=True).eval()
    folded = Classifier(
        fold_batchnorm(net_cl).to(memory_format=torch.channels_last), pre, test.classes, channels_last=True
    ).eval()
    variants: dict[str, Variant] = {
        "reference": reference,
        "nchw": lambda u: nchw(to_float(u.to(device))),
        "channels_last": lambda u: cl(to_float(u.to(device))),
        "channels_last_bn_folded": lambda u: folded(to_float(u.to(device))),
    }

    def folded_one_thread(u: torch.Tensor) -> torch.Tensor:
        with num_threads(1):
            return folded(to_float(u.to(device)))

    if torch.get_num_threads() > 1:
        variants["channels_last_bn_folded_1thread"] = folded_one_thread  # the machine's lever, not resnetlab's
    if args.compile:
        compiled = torch.compile(folded)
        variants["compiled"] = lambda u: compiled(to_float(u.to(device)))
    return variants, macs


def _check_variants_agree(variants: dict[str, Variant], probe: torch.Tensor) -> float | None:
    """Refuse variants that disagree with the reference (folding and NHWC change rounding only).

    Returns the seconds of the compiled variant's first call (its compilation), None without it.
    """
    compile_seconds = None
    want = variants["reference"](probe)
    for name, fn in variants.items():
        t0 = time.perf_counter()
        got = fn(probe)
        if name == "compiled":
            compile_seconds = round(time.perf_counter() - t0, 1)
        err = (got.float() - want.float()).abs().max().item()
        if err > 1e-2 * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"inference variant {name} disagrees with the reference by {err}")
    return compile_seconds


def _time_variants(
    variants: dict[str, Variant], test: Split, batch_sizes: list[int], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    """variant -> batch size (as a string) -> the median call's images/s and latency, round-robin timed."""
    results: dict[str, dict[str, Any]] = {}
    for bs in batch_sizes:
        if bs > len(test):
            raise UsageError(f"--batch-sizes {bs} is larger than the {len(test)} test images")
        images = test.images[:bs]
        reps = args.reps if bs > 8 else max(args.reps, args.small_reps)
        calls = {name: (lambda fn=fn, images=images: fn(images)) for name, fn in variants.items()}
        for name, ts in round_robin(calls, reps, device, warmup=1).items():
            med = statistics.median(ts)
            results.setdefault(name, {})[str(bs)] = {
                "images_per_s": round(bs / med, 2),
                "latency_ms_per_image": round(1000 * med / bs, 3),
                "call_ms": round(1000 * med, 3),
                "reps": reps,
            }
    return results


def _infer_result(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    batch_sizes: list[int],
    size: int,
    macs: int,
    pk: dict[str, Any],
) -> tuple[dict[int, str], dict[str, Any]]:
    """(the fastest of resnetlab's variants per batch size, the per-batch figures against the reference)."""
    candidates = [n for n in results if n != "reference" and not n.endswith("_1thread")]
    best = {bs: max(candidates, key=lambda n: results[n][str(bs)]["images_per_s"]) for bs in batch_sizes}
    result: dict[str, Any] = {"model": args.model, "resize": size, "dataset": args.dataset, "batch_sizes": batch_sizes}
    for bs in batch_sizes:
        b = str(bs)
        ours, ref = results[best[bs]][b], results["reference"][b]
        result[f"batch{bs}"] = {
            "resnetlab_images_per_s": ours["images_per_s"],
            "resnetlab_latency_ms": ours["latency_ms_per_image"],
            "reference_images_per_s": ref["images_per_s"],
            "reference_latency_ms": ref["latency_ms_per_image"],
            "ratio": round(ours["images_per_s"] / ref["images_per_s"], 3),
            "best_variant": best[bs],
            "gflops_per_s": round(ours["images_per_s"] * 2 * macs / 1e9, 2),
        }
        if "channels_last_bn_folded_1thread" in results:
            one = results["channels_last_bn_folded_1thread"][b]["images_per_s"]
            result[f"batch{bs}"]["one_thread_ratio"] = round(
                one / results["channels_last_bn_folded"][b]["images_per_s"], 3
            )
        result[f"images_per_s_batch{bs}"] = ours["images_per_s"]
        result[f"latency_ms_batch{bs}"] = ours["latency_ms_per_image"]
        result[f"batch{bs}"]["fraction_of_fp32_peak"] = round(
            result[f"batch{bs}"]["gflops_per_s"] / pk["fp32_peak_gflops"], 4
        )
    return best, result
