"""Thin argparse front. Each command's work lives in its package; this file only parses.

Handlers are imported lazily so that `resnetlab predict --onnx` never imports torch and
`resnetlab --help` is instant. Every `ResnetlabError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Sequence

from resnetlab.errors import ResnetlabError

# command name -> "module:function" taking the parsed argparse.Namespace and returning an exit code
HANDLERS: dict[str, str] = {
    "summary": "resnetlab.models.summary:run_summary",
    "models": "resnetlab.models.summary:run_models",
    "data": "resnetlab.data.cli:run_data",
    "train": "resnetlab.train.commands:run_train",
    "eval": "resnetlab.train.commands:run_eval",
    # predict dispatches to the torch-free onnxruntime path when --onnx is given
    "predict": "resnetlab.predict:run_predict",
    "export": "resnetlab.export:run_export",
    "bench": "resnetlab.bench:run_bench",
}


class _Parser(argparse.ArgumentParser):
    """Options may sit between positionals (`predict RUN --topk 1 a.png`), which plain parsing rejects,
    and a usage error is one line (the usage block of `train` is 20 lines), naming --help.

    Sub-commands parse with parse_known_intermixed_args; it refuses parsers holding sub-commands
    themselves (nargs=PARSER), which parse as usual and hand the rest to theirs. It also loses
    "--" (after which positionals may start with a dash), so the words after "--" that start with a
    dash go through it as placeholders that cannot look like options, and come back in the result.
    """

    _intermixing = False  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.13)
    _after_dashes: dict[str, str] = {}  # placeholder -> the word after "--" it stands for

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = sys.argv[1:] if args is None else list(args)
        if self._intermixing or any(a.nargs == argparse.PARSER for a in self._get_positional_actions()):
            return super().parse_known_args(given, namespace)
        if "--" in given:
            cut = given.index("--")
            # `--topk -- 1`: its value is missing, as plain parsing says
            if cut and self._wants_a_value(given[cut - 1]):
                return super().parse_known_args(given, namespace)
            words = {i: word for i, word in enumerate(given[cut + 1 :]) if word.startswith("-")}
            self._after_dashes = {f"resnetlab:word{i}:after--": word for i, word in words.items()}
            given = given[:cut] + [
                f"resnetlab:word{i}:after--" if i in words else w for i, w in enumerate(given[cut + 1 :])
            ]
        self._intermixing = True
        try:
            parsed, extras = self.parse_known_intermixed_args(given, namespace)
        finally:
            self._intermixing = False
        for name, value in vars(parsed).items():
            if isinstance(value, list):
                setattr(parsed, name, [self._after_dashes.get(v, v) if isinstance(v, str) else v for v in value])
            elif isinstance(value, str):
                setattr(parsed, name, self._after_dashes.get(value, value))
        return parsed, [self._after_dashes.get(v, v) for v in extras]

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # named here, where the sub-command is known: its --help is the one that lists its flags
            prog = " ".join(
                p for p in (self.prog, getattr(parsed, "command", None), getattr(parsed, "bench", None)) if p
            )
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)}; see {prog} --help\n")
        return parsed

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # A plain string flag or positional given as '' (`--out ''`, `eval ''`) was taken as "not given", or
        # as the path "": refused once here. A flag that may be empty says so with an explicit type=str.
        if kwargs.get("type") is None and kwargs.get("action") in (None, "store") and "choices" not in kwargs:
            kwargs["type"] = _not_empty
        return super().add_argument(*args, **kwargs)

    def _wants_a_value(self, word: str) -> bool:
        """Whether ``word`` is an option (or an abbreviation of one, as argparse allows) still waiting for its value."""
        if not word.startswith("-") or "=" in word:
            return False
        found = self._parse_optional(
            word
        )  # (action, ...) before Python 3.12.7, a list of them since; None: a positional
        if isinstance(found, list):
            found = found[0] if len(found) == 1 else None
        return bool(found) and found[0] is not None and found[0].nargs != 0

    def error(self, message: str) -> NoReturn:
        for placeholder, word in self._after_dashes.items():
            message = message.replace(placeholder, word)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _not_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty string; give a value")
    return text


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print the model's layer-by-layer output shapes, parameters and multiply-adds")
    p.add_argument("model", help="a registered model name (see `resnetlab models`)")
    p.add_argument("--input", default="1x1x224x224", help="input shape NxCxHxW (default 1x1x224x224)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the C of --input)")
    p.add_argument("--stem", choices=["imagenet", "small"], default=None)
    p.add_argument("--width", type=int, default=None, help="base channel count (default 64)")
    p.add_argument("--max-width", type=int, default=None, help="the most channels a stage has (default: no cap)")
    sub.add_parser("models", help="list the registered models with parameters and multiply-adds")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="find, download and verify datasets")
    p.add_argument("action", choices=["info", "fetch", "verify"])
    p.add_argument(
        "name", nargs="?", default=None, help="fashion-mnist, mnist, cifar10 or folder:PATH (default: all built-in)"
    )
    p.add_argument("--root", default=None, help="look here first (also $RESNETLAB_DATA)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a recipe (default: fast)",
        description="Train with a recipe; every recipe field can be overridden by its flag.",
    )
    p.add_argument("--recipe", help="d2l, fast, accurate or best (default fast)")
    # Recipe overrides: None means "keep the recipe's value"; switch: an on/off field, --x and --no-x.
    switch = functools.partial(p.add_argument, action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--model")
    p.add_argument("--dataset", help="fashion-mnist, mnist, cifar10 or folder:PATH")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per-process batch; the global batch is this times the world size")
    p.add_argument("--lr", type=float)
    p.add_argument("--resize", type=int, help="train and test at this square size (0 keeps the native size)")
    p.add_argument(
        "--progressive-sizes",
        metavar="SIZES",
        help=(
            "progressive resizing: train the first epochs at these sizes, e.g. 16 (none: off); "
            "the last trains at --resize"
        ),
    )
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float)
    switch("--nesterov", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "onecycle", "cosine"])
    p.add_argument("--warmup", type=float, help="fraction of all steps spent warming up linearly (any schedule)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--augment", help="none, or a comma list of flip, crop, erase")
    p.add_argument("--crop-padding", type=int, help="random-crop padding in pixels")
    switch("--normalize", help="standardise inputs with the training split's mean and std")
    p.add_argument("--init", choices=["xavier", "default"], help="xavier (the chapter's) or the model's own")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    switch("--channels-last")
    switch("--compile")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=int, help="train on a seeded random subset of N training images")
    p.add_argument("--width", type=int, help="model base width")
    p.add_argument("--max-width", type=int, help="the most channels a stage has; the later stages stop doubling there")
    p.add_argument("--stem", choices=["imagenet", "small"])
    switch("--zero-init-residual", help="zero the last BatchNorm of every residual branch")
    switch("--whiten-stem", help="first convolution: frozen filters that whiten the training images' patches")
    switch("--lookahead", help="every 5 steps, reset the weights to a slow average of them; end on it")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="test-set accuracy after every N-th epoch and after the last (0: after the last only)",
    )
    switch("--tta", help="flip test-time augmentation")
    p.add_argument(
        "--tta-translate", type=int, metavar="PX", help="TTA with PX-pixel shifts too (models trained with crops)"
    )
    p.add_argument("--data-root", help="look for datasets here first")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run in --out (its files are kept until the new run's first checkpoint)",
    )
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--init-from", metavar="PATH", help="start from torchvision/timm ResNet weights")
    p.add_argument("--nproc", type=int, help="launch N processes on this machine with torchrun")
    switch("--sync-bn")
    switch("--scale-lr", help="multiply lr by the world size")


INFERENCE_PRECISIONS = ["fp32", "bf16", "auto"]
INFERENCE_PRECISION_HELP = "fp32 (default: the same results on every machine), bf16, or auto (bf16 where native)"


def _add_use(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("checkpoint", help="a run directory or its last.safetensors")
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-root")
    p.add_argument("--batch-size", type=int, help="default: the batch size the run evaluated with")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32", help=INFERENCE_PRECISION_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="top-k classes for image files")
    p.add_argument("checkpoint", nargs="?", help="a run directory or checkpoint (omit with --onnx)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument(
        "--onnx",
        metavar="MODEL",
        help="run an exported .onnx file (or a run directory's model.onnx) with onnxruntime, without torch",
    )
    p.add_argument("--topk", type=int, default=3)
    p.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="fp32",
        help=INFERENCE_PRECISION_HELP + " (not with --onnx)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a checkpoint (ONNX) with preprocessing inside")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", help="output file (default: beside the checkpoint, model.onnx)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--data-root")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: resnetlab against the chapter's reference loop, and its own choices")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    b = bsub.add_parser("train", help="training images/s: chapter's reference loop vs resnetlab, same run")
    b.add_argument("--model", default="d2l_resnet18", help="registry name, both sides (default d2l_resnet18)")
    b.add_argument("--resize", type=int, default=96, help="square input side, both sides (default 96, the chapter's)")
    b.add_argument("--steps", type=int, default=20, help="timed training steps of each side (default 20)")
    b.add_argument("--batch-size", type=int, default=256, help="images per step, both sides (default 256)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first (default 2)")
    b.add_argument(
        "--block",
        type=int,
        help="steps timed together between device synchronisations "
        "(default 1 on the CPU, 20 on a GPU, where a sync after every step would stall its queue)",
    )
    b.add_argument("--workers", type=int, default=4, help="the reference DataLoader's workers (the chapter: 4)")
    b.add_argument("--seed", type=int, default=0, help="seeds both sides' init and order (default 0)")
    b.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="resnetlab side in NHWC"
    )
    b.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the resnetlab side"
    )
    b.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="resnetlab side (auto: bf16 only where native)",
    )
    b.add_argument(
        "--levers",
        default="none",
        help="also measure each lever on/off: all, none or a comma list of "
        "channels_last, compile, bf16, in_memory_data, one_thread",
    )
    b.add_argument("--lever-batch-size", type=int, default=32, help="batch size of the lever measurements (default 32)")
    b.add_argument("--lever-steps", type=int, default=3, help="timed steps per lever setting (default 3)")
    _add_bench_common(b)
    b = bsub.add_parser(
        "time-to-accuracy", help="wall-clock from process start to a test accuracy, and the training seconds in it"
    )
    b.add_argument("--recipe", default="fast", help="the recipe to train (default fast)")
    b.add_argument("--target", type=float, default=0.924, help="test accuracy to reach, a fraction (default 0.924)")
    b.add_argument("--seeds", type=int, default=3, help="runs, one per seed; the median is reported (default 3)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    b.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+SEEDS-1 (default 0)")
    b.add_argument(
        "--train-args",
        type=str,
        default="",
        help='extra `resnetlab train` flags, e.g. --train-args="--epochs 3 --subset 2048"',
    )
    b = bsub.add_parser("infer", help="eval images/s and per-image latency at batch 1 and 256")
    b.add_argument("--model", default="d2l_resnet18", help="registry name (default d2l_resnet18)")
    b.add_argument("--resize", type=int, default=96, help="square input side (default 96)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    b.add_argument("--batch-sizes", default="1,256", help="comma list (default 1,256)")
    b.add_argument("--reps", type=int, default=3, help="timed calls per variant at batches over 8 (median)")
    b.add_argument("--small-reps", type=int, default=20, help="timed calls per variant at batches up to 8")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="also time torch.compile")
    _add_bench_common(b)
    _add_bench_chapter_checks(bsub)
    _add_bench_studies(bsub)


def _add_bench_chapter_checks(bsub: argparse._SubParsersAction) -> None:
    """The bench commands that set resnetlab against the chapter's loop besides train/infer/time-to-accuracy."""
    b = bsub.add_parser(
        "pipeline", help="input pipeline alone (no model): resnetlab's in-memory batches vs the chapter's DataLoader"
    )
    b.add_argument("--dataset", default="fashion-mnist", help="the images (default fashion-mnist)")
    b.add_argument("--data-root", help="look for the dataset here first")
    b.add_argument("--size", type=int, default=96, help="square side both sides resize to (default 96, the chapter's)")
    b.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    b.add_argument("--batches", type=int, default=20, help="timed batches of each side (default 20)")
    b.add_argument(
        "--workers", type=int, default=2, help="the reference DataLoader's workers (default 2; the chapter: 4)"
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--json", action="store_true", help="also print the figures as one JSON object on the last line")
    b = bsub.add_parser(
        "accuracy-holds",
        help="the chapter's loop and the d2l recipe, same seed and epochs: same test accuracy? (exit 1 when not)",
    )
    b.add_argument("--epochs", type=int, default=2, help="epochs of each run (default 2)")
    b.add_argument("--tolerance", type=float, default=0.5, help="allowed gap in test-accuracy points (default 0.5)")
    b.add_argument(
        "--control",
        action="store_true",
        help="also train the reference loop on resnetlab's batch order (PIL inputs) to split the gap",
    )
    _add_bench_chapter_run(b)
    b = bsub.add_parser("reference", help="train the chapter's ResNet-18 exactly the chapter's way (no torchvision)")
    b.add_argument("--epochs", type=int, help="default the chapter's, 10")
    b.add_argument("--lr", type=float, help="default the chapter's, 0.05")
    b.add_argument("--batch-size", type=int, help="default the chapter's, 256")
    b.add_argument("--model", help="registry name (default the chapter's, d2l_resnet18)")
    _add_bench_chapter_run(b)


def _add_bench_chapter_run(b: argparse.ArgumentParser) -> None:
    """The flags of a command that trains the chapter's way: what to train on, where, and with what seed."""
    b.add_argument("--seed", type=int, default=0, help="seeds the init and the shuffle, and picks --subset (default 0)")
    b.add_argument(
        "--subset", type=int, default=0, help="train on this seeded subset, as resnetlab train --subset (0: all)"
    )
    b.add_argument("--resize", type=int, help="square input side (default the chapter's, 96; 0 keeps the native size)")
    b.add_argument("--workers", type=int, help="the reference DataLoader's workers (default the chapter's, 4)")
    b.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), mnist, cifar10 or folder:PATH")
    b.add_argument("--data-root", help="look for the dataset here first")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def _add_bench_studies(bsub: argparse._SubParsersAction) -> None:
    """The bench commands that measure one of resnetlab's own choices."""
    b = bsub.add_parser("fast-step", help="a recipe's own training step, eager vs torch.compile, interleaved (CPU)")
    b.add_argument("--recipe", default="fast", help="d2l, fast, accurate or best (default fast)")
    b.add_argument("--steps", type=int, default=20, help="timed steps of each side (default 20)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first (default 2)")
    b.add_argument("--dataset", help="default: the recipe's")
    b.add_argument("--data-root", help="look for the dataset here first")
    b = bsub.add_parser(
        "conv-backward", help="a recipe's convolutions: forward vs input and weight gradients, per layer (CPU)"
    )
    b.add_argument("--recipe", default="fast", help="d2l, fast, accurate or best (default fast)")
    b.add_argument("--batch-size", type=int, help="default: the recipe's")
    b.add_argument("--reps", type=int, default=15, help="timed calls per figure; the median is printed (default 15)")
    b = bsub.add_parser("eval-batch", help="a run's end-of-epoch test pass at several batch sizes, interleaved")
    b.add_argument("run", help="a resnetlab run directory or its last.safetensors")
    b.add_argument("--batch-sizes", default="64,128,256,1000", help="comma list (default 64,128,256,1000)")
    b.add_argument("--rounds", type=int, default=4, help="timed passes over the test split per size (default 4)")
    b.add_argument("--json", action="store_true", help="also print the figures as one JSON object on the last line")
    b = bsub.add_parser(
        "strided-projection", help="training step with the shortcuts' stride sliced vs a strided 1x1 convolution (CPU)"
    )
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 only where native")
    b.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; the median is printed (default 5)")
    b.add_argument("--steps", type=int, default=5, help="training steps per variant per round (default 5)")
    b.add_argument(
        "--cases", default="fast,d2l", help="comma list of fast (resnet10 w16 @24) and d2l (d2l_resnet18 @96)"
    )


def _add_bench_common(b: argparse.ArgumentParser) -> None:
    b.add_argument("--dataset", default="fashion-mnist", help="the images the steps run on (default fashion-mnist)")
    b.add_argument("--data-root", help="look for the dataset here first")
    b.add_argument("--peak-size", type=int, default=2048, help="side of the fp32 peak matmul")
    b.add_argument("--bf16-peak-size", type=int, default=512, help="side of the bf16 peak matmul (slow where emulated)")
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resnetlab", description="Residual networks: build, train, evaluate, export.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_summary(sub)
    _add_data(sub)
    _add_train(sub)
    _add_use(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _one_line_warnings(), _sigterm_unwinds(args.command != "train"):
            return int(_handler(args.command)(args) or 0)
    except ResnetlabError as err:
        if not (err.said_by_rank_zero and os.environ.get("RANK", "0") != "0"):
            print(f"resnetlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except (MemoryError, RuntimeError) as err:
        if _lost_peers(err):  # a torchrun worker whose peer died: the launcher (or torchrun) names that one
            said = re.split(r"\.\s", (str(err).strip().splitlines() or [type(err).__name__])[0], maxsplit=1)[0]
            print(
                f"resnetlab: error: process {os.environ.get('RANK')} lost the other processes ({said}): "
                f"one of them died; {_after_lost_peers(args)}",
                file=sys.stderr,
            )
            return 1
        if not isinstance(err, MemoryError) and not _TOO_LARGE.search(str(err)):
            raise
        print(f"resnetlab: error: {_too_large(err, args)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`resnetlab models | head -1`): stop quietly, as `ls | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the flush at exit raises it again
        if args.command == "train":
            print("resnetlab: stdout was closed, so the run stopped", file=sys.stderr)
        return 128 + getattr(signal, "SIGPIPE", 13)  # as a shell reports a writer SIGPIPE stopped (not on Windows)
    except OSError as err:  # the machine's state, not a bug: a full disk, a read-only or forbidden path
        fix = _OS_FIXES.get(err.errno or 0)
        if fix is None:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"resnetlab: error: {err.strerror or err}{where}; {fix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("resnetlab: interrupted", file=sys.stderr)
        return 130


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings (Pillow's, torch's) as one ``resnetlab: warning:`` line each, like errors, instead
    of Python's ``file:line: Category: message`` followed by the source line that raised it."""

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        if sys.stderr is None:  # started with stderr closed: print(file=None) would write into stdout (--json)
            return
        try:
            kind = (
                "" if category is UserWarning else f" ({category.__name__})"
            )  # resnetlab's own warnings are UserWarnings
            print(f"resnetlab: warning: {' '.join(str(message).split())}{kind}", file=sys.stderr)
        except OSError:  # a closed or broken stderr must not stop the command (Python's own printer ignores it too)
            pass

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


@contextmanager
def _sigterm_unwinds(enabled: bool) -> Iterator[None]:
    """Turn SIGTERM (``timeout``, ``kill``, a job scheduler) into SystemExit(143), so that the
    ``finally``/``except`` blocks that remove temporary files (export, downloads) run. Not for
    ``train``: it checkpoints at the next step itself (``loop.stop_flag``), except under torchrun."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# errno -> the fix, for file-system failures a command cannot work around (a run's last checkpoint
# stays intact: checkpoints are written to a temporary file and renamed).
_OS_FIXES = {
    errno.ENOSPC: "free some disk space or write elsewhere (--out); a run resumes from its last checkpoint",
    errno.EDQUOT: "free some of your disk quota or write elsewhere (--out); a run resumes from its last checkpoint",
    errno.EACCES: "check the permissions or choose another path (--out)",
    errno.EPERM: "check the permissions or choose another path (--out)",
    errno.EROFS: "the file system is read-only; choose another path (--out)",
}

# How torch says a tensor cannot be allocated (CPU, CUDA, MPS) or its size cannot even be computed.
_TOO_LARGE = re.compile(r"can't allocate memory|out of memory|Storage size calculation overflowed")
# Options that size tensors: a bound on each would be arbitrary, so the allocation failure names them instead.
_SIZE_OPTIONS = (
    "input",
    "width",
    "max_width",
    "resize",
    "progressive_sizes",
    "batch_size",
    "eval_batch_size",
    "batch_sizes",
    "lever_batch_size",
    "peak_size",
    "bf16_peak_size",
)


# How gloo says a peer's connection is gone. Its collectives raise these as plain RuntimeErrors, not as
# torch.distributed.DistError (PyTorch 2.13: all_reduce, broadcast, barrier, DDP's buffer broadcast).
_PEER_GONE = re.compile(r"gloo/transport/.*(?:Connection (?:reset|closed) by peer|Broken pipe)")


def _lost_peers(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed failing to reach the other workers (one of them died)."""
    dist = sys.modules.get("torch.distributed")
    if "RANK" not in os.environ or dist is None:
        return False
    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and bool(_PEER_GONE.search(str(err)))
    )


def _after_lost_peers(args: argparse.Namespace) -> str:
    """What happens after a worker lost its peers: torchelastic's restart, or the command that continues the run."""
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    restarts, done = (
        os.environ.get("TORCHELASTIC_MAX_RESTARTS"),
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    )
    if restarts is not None and done < int(restarts):
        return f"torchrun restarts them all (restart {done + 1} of {restarts}), " + (
            "resuming from the last checkpoint" if run else "starting over (give --out to resume instead)"
        )
    stops = "torchrun stops the job (no restarts left); " if restarts is not None else ""
    nproc = (
        f" --nproc {os.environ['WORLD_SIZE']}"
        if os.environ.get("GROUP_WORLD_SIZE", "1") == "1" and "WORLD_SIZE" in os.environ
        else ""
    )
    return f"{stops}continue from the last checkpoint with: resnetlab train --resume {run or 'RUN_DIR'}{nproc}"


def _too_large(err: BaseException, args: argparse.Namespace) -> str:
    """One line for an allocation that failed: what was asked for and the sizes given to make smaller."""
    text = str(err).strip()
    asked = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator's message is long and low-level
    what = (
        f"a {int(asked.group(1)) / 2**30:,.1f} GiB tensor" if asked else (text.splitlines() or [type(err).__name__])[0]
    )
    given = ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in _SIZE_OPTIONS and v is not None
    )
    return f"out of memory ({what}); make the model, images or batch smaller" + (f" (given: {given})" if given else "")


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = HANDLERS[command].partition(":")
    return getattr(importlib.import_module(module), func)


def _version() -> str:
    from resnetlab import __version__

    return f"resnetlab {__version__}"
