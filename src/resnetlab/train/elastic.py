"""torchelastic's restarts: a restarted worker group continues its run; a run resumes only on its own world size.

Also the opt-in debug hook that records the global per-step loss (the tests compare world sizes with it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as td

from resnetlab.errors import UsageError
from resnetlab.fileio import CHECKPOINT_NAME
from resnetlab.train.dist import active, all_reduce_sum, restart_count

__all__ = ["STEP_LOSS_ENV", "check_world_size", "job_id", "record_step_loss", "restarted_run"]

# Opt-in debug hook: rank 0 appends one JSON line per training step with the loss averaged over
# the global batch (one extra all-reduce per step; used by the tests to compare world sizes).
STEP_LOSS_ENV = "RESNETLAB_DEBUG_STEP_LOSSES"


def job_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``; a fresh uuid under ``--standalone``), else None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def restarted_run(out: str | os.PathLike | None) -> str | None:
    """What a worker that torchelastic (re)started should do with ``--out``: ``"resume"``, ``"restart"`` or None.

    Only when ``out``'s config.json names this torchrun job (its ``torchelastic_run_id``, which is
    ``--rdzv-id``, or a fresh uuid under ``--standalone``): then this is a restart of the job that
    wrote it, and the run resumes from ``out``'s checkpoint, or starts over when the failure came
    before the first one. The restart count alone cannot tell: on a node restarted because another
    node failed it stays 0. With torchrun's default id "none", shared by every job, a restart count
    above 0 is required as well. A directory another job wrote is never taken over: that case is
    the usual "already exists" error.
    """
    if not out or job_id() is None or (job_id() == "none" and restart_count() < 1):
        return None
    run_dir = Path(out)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("torchelastic_run_id") != job_id():
        return None

    return "resume" if (run_dir / CHECKPOINT_NAME).is_file() else "restart"


def check_world_size(saved: int | None, world_size: int, run_dir: Path) -> None:
    """A run resumes only on the world size it was trained with (global batch, shards and lr depend on it)."""
    if saved is not None and int(saved) != world_size:
        raise UsageError(
            f"{run_dir} was trained by {saved} process(es) but this run has {world_size}; "
            f"resume it with {saved} (e.g. --nproc {saved}): the global batch, the data shards and "
            "--scale-lr depend on the world size"
        )


def record_step_loss(epoch: int, step: int, loss: torch.Tensor, count: int) -> None:
    """With $RESNETLAB_DEBUG_STEP_LOSSES set: rank 0 appends the global mean loss of this step."""
    path = os.environ.get(STEP_LOSS_ENV)
    if not path:
        return
    t = torch.stack(
        [loss.detach().double() * count, torch.tensor(float(count), dtype=torch.float64, device=loss.device)]
    )
    t = all_reduce_sum(t).tolist()
    if not active() or td.get_rank() == 0:
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {"epoch": epoch, "step": step, "loss": t[0] / t[1], "count": int(t[1]), "restart": restart_count()}
                )
                + "\n"
            )
