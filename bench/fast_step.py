"""One recipe's training step on random batches, eager vs ``torch.compile``, in one run.

    python bench/fast_step.py                      # the fast recipe: resnet10, width 16, small stem, 28 px
    python bench/fast_step.py --recipe best --steps 10

`resnetlab bench train` measures the levers on the chapter's model against its reference loop; this
measures them on a recipe's own (small) model, where compile time weighs more. Prints images/s of
each and the seconds the first two steps took (compilation included).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from resnetlab.models import create_model
from resnetlab.train import RECIPES


def images_per_s(recipe_name: str, compiled: bool, steps: int) -> tuple[float, float]:
    r = RECIPES[recipe_name]
    size = r.resize or 28
    torch.manual_seed(0)
    net = create_model(r.model, num_classes=10, in_chans=1, **r.model_options())
    net = net.to(memory_format=torch.channels_last) if r.channels_last else net
    opt = torch.optim.SGD(net.parameters(), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov, foreach=True)
    model = torch.compile(net) if compiled else net
    loss_fn = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    x = torch.randn(r.batch_size, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (r.batch_size,))

    def step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step(), step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * r.batch_size / (time.perf_counter() - t0), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="fast", choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    for label, compiled in (("eager", False), ("compile", True), ("eager", False)):
        rate, first = images_per_s(a.recipe, compiled, a.steps)
        print(f"{a.recipe} {label:>7}: {rate:7.0f} images/s (first two steps {first:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
