"""The training loop, readable top to bottom: resolve the request, set up the process group, build
the run, then for each epoch :func:`run_epoch` and :func:`end_epoch`, then :func:`finish`.

Data flows one way: uint8 dataset tensors on the device -> a whole batch indexed -> resize and
augment on the batch -> model -> metrics -> run directory. Everything random is a pure function of
(seed, epoch, step), so a run killed at any step and resumed from its checkpoint reproduces the
uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.device import (
    autocast_dtype,
    cpu_class,
    describe,
    environment,
    resolve_device,
    resolve_precision,
    warn_if_emulated,
)
from resnetlab.fileio import CHECKPOINT_NAME
from resnetlab.train import dist, elastic
from resnetlab.train.evaluate import accuracy, evaluate
from resnetlab.train.live import live_curves
from resnetlab.train.recipes import Recipe
from resnetlab.train.request import Request, resolve_request
from resnetlab.train.rundir import RunFiles, plot_confusion, prepare_run_dir, write_json
from resnetlab.train.setup import Run, build_run
from resnetlab.train.signals import TrainingInterrupted, stop_flag, stopped
from resnetlab.train.state import EMPTY_INTERVAL, EMPTY_SUMS, Checkpointer, EpochMeter, progress_bar
from resnetlab.train.step import NonFiniteLoss, augment_generator, lr_factor, train_inputs, train_step

__all__ = ["RunResult", "train"]


@dataclass
class RunResult:
    """What a finished run reports (the same figures as the run directory)."""

    run_dir: Path
    train_loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float  # whole epochs, data included
    compute_examples_per_sec: float  # the chapter's measure: time inside training steps only
    device: str
    history: list[dict[str, Any]] = field(default_factory=list)
    confusion: torch.Tensor | None = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME


def train(
    recipe: str | Recipe | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    checkpoint_every: int = 0,
    data_root: str | None = None,
    init_from: str | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> RunResult:
    """Train a model with a recipe; the Python twin of ``resnetlab train``.

    Args:
        recipe: a recipe name (``d2l``, ``fast``, ``best``) or a :class:`Recipe`; default ``fast``
            (none with ``resume``: a run continues with its own recipe).
        out: the run directory (default ``runs/<recipe>-<timestamp>``).
        resume: a run directory to continue where it stopped (no other overrides but ``device``).
        force: replace the run in ``out`` (kept aside until the new run's first checkpoint).
        checkpoint_every: also checkpoint every N steps (0: at epoch ends only).
        data_root: look for the dataset here first.
        init_from: torchvision/timm ResNet weights to start from.
        progress: show a progress bar (default: when stdout is a terminal).
        **overrides: recipe fields to change, e.g. ``epochs=2, batch_size=128``.
    """
    request = resolve_request(
        recipe,
        out=out,
        resume=resume,
        force=force,
        checkpoint_every=checkpoint_every,
        data_root=data_root,
        init_from=init_from,
        overrides=overrides,
    )
    ctx = dist.setup(resolve_device(request.recipe.device))
    # fixed shapes: cuDNN times its kernels once and keeps the fastest (as timm's train.py)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if request.resumed:
        elastic.check_world_size(request.resumed[1].get("world_size"), ctx.world_size, request.run_dir)
    run_dir = request.run_dir or _new_run_dir(request, ctx)
    run = build_run(request, ctx, resolve_precision(request.recipe.precision, ctx.device), init_from)
    run.live = live_curves(run.title, ctx.is_main)  # None outside a notebook
    state = run.state
    dist.check_agree(
        (state.epoch, state.step, len(state.history)), "where the run stands (epoch, step, finished epochs)"
    )
    files = RunFiles(
        run_dir,
        new=request.resumed is None,
        unique=not request.out and request.resumed is None,
        force=request.force,
        resumed_stamp=request.stamp,
    )  # rank 0 creates (and locks) the directory
    show_bar = ctx.is_main and (progress if progress is not None else sys.stdout.isatty())
    confusion = None
    # A failure before the first checkpoint removes what this run wrote (and puts back a run --force set aside).
    with stop_flag(sigterm=ctx.world_size == 1 and elastic.job_id() is None) as stop, files:
        saver = Checkpointer(files, state, run.checkpoint_meta(request.data_root), ctx, stop)
        # only now: bad data or a bad model size leaves no empty run directory, nor --force a deleted run
        if ctx.is_main:
            files.create()
            saver.run_dir = files.run_dir
            announce(run, request, saver)
        # a default name may have become NAME-2 on rank 0, which alone knows of an old run set aside
        saver.run_dir, saver.replacing = dist.broadcast_object((files.run_dir, files.replacing))
        while state.epoch < run.recipe.epochs:
            run_epoch(run, saver, stop, checkpoint_every, show_bar)
            confusion = end_epoch(run, saver, show_bar)
        result = finish(run, saver.run_dir, confusion)
        files.release()  # after the run's last file: another run may now use the directory
    dist.teardown(ctx)
    return result


def announce(run: Run, request: Request, saver: Checkpointer) -> None:
    """Rank 0: the header line, a resume's line (and its metrics repaired), config.json for a new run."""
    recipe, ctx, precision, state = run.recipe, run.ctx, run.precision, run.state
    procs = f" x {ctx.world_size} processes" if ctx.world_size > 1 else ""
    layout = ", channels_last" if recipe.channels_last else ""
    print(
        f"training on {describe(ctx.device)}{procs}: "
        f"{precision}{' autocast' if autocast_dtype(precision) else ''}{layout}",
        flush=True,
    )
    warn_if_emulated(precision, ctx.device)
    run_dir = saver.run_dir
    if request.resumed:
        finished = state.epoch >= recipe.epochs
        print(
            f"{run_dir} finished its {recipe.epochs} epochs; evaluating it again"
            if finished
            else f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}",
            flush=True,
        )
        saver.write_history(
            run.title
        )  # a kill between a checkpoint and the metrics written after it left them one epoch behind
    # a resume keeps the command and commit that started it
    if not request.resumed or not (run_dir / "config.json").exists():
        write_json(
            run_dir / "config.json",
            {
                "recipe": dataclasses.asdict(recipe),
                "precision": precision,
                "cpu_class": cpu_class() if ctx.device.type == "cpu" else None,
                "world_size": ctx.world_size,
                "global_batch_size": recipe.batch_size * ctx.world_size,
                "lr_applied": run.lr,
                "seed": recipe.seed,
                "torchelastic_run_id": elastic.job_id(),
                **environment(ctx.device),
            },
        )


def run_epoch(run: Run, saver: Checkpointer, stop: dict[str, Any], checkpoint_every: int, show_bar: bool) -> None:
    """The epoch's steps from where the run stands.

    Each step: lr, inputs, one :func:`train_step`, the meter, a row of the curve and a checkpoint when due.

    Args:
        run: the built run; its state's (epoch, step) advance.
        saver: writes the checkpoints.
        stop: the signal flag: after a Ctrl-C or SIGTERM the step is checkpointed and the run stops.
        checkpoint_every: also checkpoint every N steps (0: at epoch ends only).
        show_bar: draw a progress bar.
    """
    recipe, state, ctx = run.recipe, run.state, run.ctx
    run.model.train()
    size = recipe.train_size(state.epoch)  # the test size, or smaller in early epochs (progressive resizing)
    bar = progress_bar(run.steps_per_epoch, f"epoch {state.epoch + 1}/{recipe.epochs}", show_bar, state.step)
    meter = EpochMeter(ctx.device, state.interval)
    amp_dtype = autocast_dtype(run.precision)
    for step, (images, labels) in enumerate(run.train_loader.batches(state.epoch, state.step), start=state.step):
        global_step = state.epoch * run.steps_per_epoch + step
        for group in state.optimizer.param_groups:
            group["lr"] = run.lr * lr_factor(recipe, global_step, run.total_steps)
        x = train_inputs(
            images, recipe, state.preprocess, augment_generator(recipe.seed, state.epoch, step, ctx.rank), size
        )
        meter.clock.start()
        try:  # the finiteness check is a host sync: every step on the CPU, where it is free
            loss, logits = train_step(
                run.model,
                x,
                labels,
                state.optimizer,
                state.scaler,
                run.loss_fn,
                amp_dtype,
                check_finite=ctx.device.type == "cpu" or step % 20 == 0,
            )
        except NonFiniteLoss as err:
            kept = (
                f"the last good checkpoint in {saver.run_dir} is kept"
                if saver.files.checkpointed
                else "no checkpoint was written yet"
            )
            raise NonFiniteLoss(
                f"{err} at epoch {state.epoch + 1}, step {step} (lr {state.optimizer.param_groups[0]['lr']:.4g}); "
                f"{kept}. Lower --lr" + (" or use --precision fp32" if amp_dtype else "")
            ) from None
        if state.lookahead is not None:
            state.lookahead.after_step(state.net, global_step + 1, run.total_steps)
        meter.clock.stop()
        meter.add(loss, logits, labels)
        elastic.record_step_loss(state.epoch, step, loss, len(labels))
        state.step = step + 1
        if state.step % run.row_every == 0 or state.step == run.steps_per_epoch:
            add_row(run, meter.take_interval(state.sums), saver, bar)
        if bar is not None:
            bar.update(1)
        if stop["interrupted"] or (checkpoint_every and (global_step + 1) % checkpoint_every == 0):
            if stop["interrupted"] and bar is not None:
                bar.close()
            state.interval = meter.interval()  # first: it waits for the queued steps
            meter.take_seconds(state.sums)
            saver.save()
            if stop["interrupted"]:
                nproc = f" --nproc {ctx.world_size}" if ctx.world_size > 1 else ""
                raise TrainingInterrupted(
                    f"{stopped(stop)} at epoch {state.epoch + 1}, step {state.step}; checkpoint saved, "
                    f"continue with: resnetlab train --resume {saver.run_dir}{nproc}",
                    stop["signal"],
                )
    if bar is not None:
        bar.close()
    state.interval = dict(EMPTY_INTERVAL)  # the epoch's last step closed it
    meter.take_seconds(state.sums)


def add_row(run: Run, interval: dict[str, Any], saver: Checkpointer, bar: Any) -> None:
    """Append the curve's row for the steps since the last one: training loss and accuracy over all ranks."""
    state = run.state
    row = {
        "kind": "step",
        "epoch": state.epoch + 1,
        "step": state.epoch * run.steps_per_epoch + state.step,
        "epoch_fraction": state.step / run.steps_per_epoch,
        "train_loss": interval["loss"] / interval["count"],
        "train_acc": interval["correct"] / interval["count"],
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    state.curve.append(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}")
    if run.live is not None:
        run.live.update(state.curve, state.history)


def end_epoch(run: Run, saver: Checkpointer, show_bar: bool) -> torch.Tensor | None:
    """Test when due, record the epoch's row, checkpoint, write the metrics.

    Test accuracy is measured in eval mode on the whole test split, every ``eval_every``-th epoch and
    after the last (None in the other rows). Returns the confusion matrix, if tested.
    """
    recipe, state, ctx = run.recipe, run.state, run.ctx
    sums = state.sums  # loss, correct and count over all ranks already (the curve's rows added them up)
    dist.broadcast_buffers(state.net)  # every rank evaluates rank 0's BatchNorm statistics, as checkpointed
    confusion, test_acc = None, None
    final = state.epoch + 1 == recipe.epochs
    if final or (recipe.eval_every and (state.epoch + 1) % recipe.eval_every == 0):
        confusion = test(run, final)
        test_acc = accuracy(confusion)
    row = {
        "kind": "epoch",
        "epoch": state.epoch + 1,
        "step": (state.epoch + 1) * run.steps_per_epoch,
        "epoch_fraction": 1.0,
        "train_loss": sums["loss"] / sums["count"],
        "train_acc": sums["correct"] / sums["count"],
        "test_acc": test_acc,
        "images_per_s": sums["count"] / max(sums["seconds"], 1e-9),
        "compute_images_per_s": sums["count"] / max(sums["compute_seconds"], 1e-9),
        "seconds": sums["seconds"],
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    state.history.append(row)
    state.epoch, state.step, state.sums = state.epoch + 1, 0, dict(EMPTY_SUMS)
    saver.save()
    if ctx.is_main:
        saver.write_history(run.title)
        if run.live is not None:
            run.live.update(state.curve, state.history)
        if not show_bar:
            tested = f"test acc {test_acc:.3f}" if test_acc is not None else "test acc not measured (--eval-every)"
            print(
                f"epoch {row['epoch']}/{recipe.epochs}: loss {row['train_loss']:.3f}, "
                f"train acc {row['train_acc']:.3f}, "
                f"{tested}, {row['images_per_s']:.1f} examples/sec, {row['seconds']:.1f} s",
                flush=True,
            )
    return confusion


def test(run: Run, final: bool) -> torch.Tensor:
    """The confusion matrix on the test split. The last test pass runs in fp32, as `resnetlab eval` does by
    default on any machine, so the accuracy a run reports is the one its checkpoint reproduces; earlier
    ones keep the training precision, for speed."""
    run.classifier.precision = "fp32" if final else run.precision
    return evaluate(run.classifier, run.test_loader, len(run.classes))


def finish(run: Run, run_dir: Path, confusion: torch.Tensor | None) -> RunResult:
    """The run's result, confusion.png and the chapter's closing lines (rank 0)."""
    history = run.state.history
    if confusion is None:  # resumed a finished run: nothing left to train, evaluate once more (fp32, as at its end)
        confusion = test(run, final=True)
    last = history[-1]
    seen = sum(r["images_per_s"] * r["seconds"] for r in history)
    result = RunResult(
        run_dir=run_dir,
        train_loss=last["train_loss"],
        train_acc=last["train_acc"],
        test_acc=accuracy(confusion),  # measured now (a finished run resumed: again)
        examples_per_sec=seen / sum(r["seconds"] for r in history),
        compute_examples_per_sec=seen
        / sum(r["images_per_s"] * r["seconds"] / r["compute_images_per_s"] for r in history),
        device=str(run.ctx.device),
        history=history,
        confusion=confusion,
    )
    if run.ctx.is_main:
        plot_confusion(
            run_dir / "confusion.png", confusion, run.classes, f"{run.recipe.model}: test acc {result.test_acc:.3f}"
        )
        # The chapter's two closing lines, then its compute-only measure for comparison.
        print(f"loss {result.train_loss:.3f}, train acc {result.train_acc:.3f}, test acc {result.test_acc:.3f}")
        print(f"{result.examples_per_sec:.1f} examples/sec on {run.ctx.device}")
        print(
            f"({result.compute_examples_per_sec:.1f} examples/sec in training steps only, the chapter's measure; "
            f"run directory {run_dir})",
            flush=True,
        )
    return result


def _new_run_dir(request: Request, ctx: dist.DistContext) -> Path:
    """A new run's directory: rank 0 chooses and checks it (only it touches the file system); every rank learns it."""
    run_dir = (
        prepare_run_dir(request.out, request.recipe.name, request.force) if ctx.is_main else Path(request.out or ".")
    )
    return Path(dist.broadcast_object(str(run_dir)))
