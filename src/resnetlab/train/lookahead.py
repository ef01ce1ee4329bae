"""Lookahead of the weights, as airbench trains: a slow copy of the network's weights and BatchNorm
statistics that follows the trained ones, and that the network is reset to every few steps.

Every :data:`EVERY` steps the slow copy moves toward the network by ``1 - decay`` and the network
takes the slow copy's values; ``decay`` grows with the cube of the run's progress, from 0 (no
averaging, while the learning rate is high) to ``0.95 ** EVERY``. After the last step the network
keeps the slow copy: the averaged weights are the ones tested, checkpointed and exported.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EVERY", "Lookahead"]

EVERY = 5  # airbench's interval, and its 0.95 per step
DECAY_PER_STEP = 0.95


class Lookahead:
    """The slow copy of ``net``'s floating-point state (parameters and BatchNorm statistics).

    Args:
        net: the network (not a DDP or compiled wrapper); the copy starts equal to it.
    """

    def __init__(self, net: nn.Module) -> None:
        self.slow = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @staticmethod
    def decay(step: int, total_steps: int) -> float:
        """How much of the slow copy is kept at ``step`` (1-based) of ``total_steps``: 1 at the last step."""
        return 1.0 if step >= total_steps else DECAY_PER_STEP**EVERY * (step / total_steps) ** 3

    @torch.no_grad()
    def after_step(self, net: nn.Module, step: int, total_steps: int) -> None:
        """After the ``step``-th step (1-based) of the run: every :data:`EVERY` steps and after the last one,
        move the slow copy toward ``net`` and set ``net`` to it."""
        if step % EVERY and step < total_steps:
            return
        keep = self.decay(step, total_steps)
        for key, value in net.state_dict().items():
            if key in self.slow:
                slow = self.slow[key]
                slow.lerp_(value, 1.0 - keep)
                value.copy_(slow)
