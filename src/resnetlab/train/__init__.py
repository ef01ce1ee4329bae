"""Training: recipes as data, the loop, checkpoints and the run directory."""

from resnetlab.inference import Classifier, load_checkpoint  # here too: `resnetlab.train.load_checkpoint` is public
from resnetlab.train.loop import RunResult, train
from resnetlab.train.recipes import RECIPES, Recipe, get_recipe
from resnetlab.train.signals import TrainingInterrupted
from resnetlab.train.step import NonFiniteLoss

__all__ = [
    "Classifier",
    "NonFiniteLoss",
    "RECIPES",
    "Recipe",
    "RunResult",
    "TrainingInterrupted",
    "get_recipe",
    "load_checkpoint",
    "train",
]
