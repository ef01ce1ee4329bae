"""A recipe's own training step, eager vs ``torch.compile``, interleaved in one run.

    python bench/fast_step.py                      # the fast recipe: resnet10, width 16, small stem, 24 px
    python bench/fast_step.py --recipe best --steps 10

`resnetlab bench train --levers compile` measures the lever on the chapter's model; this measures it
on a recipe's own model (the same ``measure_levers``), where compile time weighs more.
"""

from __future__ import annotations

import argparse
import json

import torch

from resnetlab.bench.engines import measure_levers
from resnetlab.data import load_dataset
from resnetlab.train import RECIPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="fast", choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    r = RECIPES[a.recipe]
    train, _ = load_dataset(r.dataset)
    result = measure_levers(train, ["compile"], model=r.model, batch_size=r.batch_size, resize=r.resize or None,
                            steps=a.steps, warmup=a.warmup, device=torch.device("cpu"), num_workers=0,
                            base={"base_recipe": a.recipe, "lr": r.lr, "channels_last": r.channels_last}, log=print)  # fmt: skip
    print(json.dumps({"recipe": a.recipe, **result["compile"]}))


if __name__ == "__main__":
    main()
