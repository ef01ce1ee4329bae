"""Test accuracy: the confusion matrix of a classifier over a test split, on every rank."""

from __future__ import annotations

import torch

from resnetlab.data import BatchLoader, Split, to_float
from resnetlab.errors import UsageError
from resnetlab.inference import Classifier
from resnetlab.train import dist

__all__ = ["accuracy", "evaluate", "require_test_images"]


def require_test_images(test: Split, dataset: str) -> None:
    """Refuse an empty test split up front: test accuracy divides by its size (in training after a whole epoch)."""
    if len(test) == 0:
        raise UsageError(
            f"{dataset} has no test images; add a test/ folder next to train/, or hold some out: "
            "a holdout > 0 with 2 or more images per class (folder:PATH?holdout=0.1)"
        )


@torch.no_grad()
def evaluate(classifier: Classifier, loader: BatchLoader, num_classes: int) -> torch.Tensor:
    """Confusion matrix (true x predicted, int64 on CPU) of ``classifier`` over ``loader``, all ranks, in eval mode
    with BatchNorm folded (:meth:`Classifier.folded`)."""
    scorer = classifier.folded()  # a copy: training goes on with the BatchNorm layers
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=loader.device)
    for images, labels in loader.batches(0):
        pred = scorer(to_float(images)).argmax(dim=1)
        cell = labels * num_classes + pred
        confusion.scatter_add_(0, cell, torch.ones_like(cell))  # not bincount: on CUDA it waits for the GPU
    confusion = dist.all_reduce_sum(confusion)
    return confusion.view(num_classes, num_classes).cpu()


def accuracy(confusion: torch.Tensor) -> float:
    """The fraction of a confusion matrix on its diagonal."""
    return confusion.diag().sum().item() / confusion.sum().item()
