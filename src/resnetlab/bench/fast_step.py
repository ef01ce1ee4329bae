"""``resnetlab bench fast-step``: a recipe's own training step, eager vs ``torch.compile``, interleaved in one run.

    resnetlab bench fast-step                      # the fast recipe: resnet10, width 16, small stem, 24 px
    resnetlab bench fast-step --recipe best --steps 10

`resnetlab bench train --levers compile` measures the lever on the chapter's model; this measures it
on a recipe's own model (the same ``measure_levers``), where compile time weighs more. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

from resnetlab.bench.engines import measure_levers
from resnetlab.bench.machine import cpu_line
from resnetlab.data import load_dataset
from resnetlab.device import cpu_info
from resnetlab.train import get_recipe


def run_fast_step_bench(args: argparse.Namespace) -> int:
    """Time the recipe's step with and without ``torch.compile``, on the CPU.

    Args:
        args: the parsed flags of ``resnetlab bench fast-step``: ``recipe``, ``steps``, ``warmup``,
            ``dataset`` and ``data_root`` (None: the recipe's dataset, looked for where resnetlab looks).

    Returns:
        0.
    """
    r = get_recipe(args.recipe)
    info = cpu_info()
    print(cpu_line(info))
    train, _ = load_dataset(args.dataset or r.dataset, root=args.data_root)
    result = measure_levers(
        train,
        ["compile"],
        model=r.model,
        batch_size=r.batch_size,
        resize=r.resize or None,
        steps=args.steps,
        warmup=args.warmup,
        device=torch.device("cpu"),
        num_workers=0,
        base={"base_recipe": args.recipe, "lr": r.lr, "channels_last": r.channels_last},
        log=print,
    )
    print(json.dumps({"recipe": args.recipe, **result["compile"], "cpu_class": info["cpu_class"]}))
    return 0
