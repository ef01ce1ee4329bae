"""Datasets and the input pipeline.

* :func:`load_dataset` -> (train, test) :class:`Split` (whole dataset, uint8, in memory) for
  ``fashion-mnist`` (default), ``mnist``, ``cifar10`` and ``folder:PATH``; found locally or
  downloaded with checksums (see :mod:`resnetlab.data.sources` for the lookup order).
* :class:`BatchLoader`: reproducible, resumable, shardable batches on the training device.
* :mod:`resnetlab.data.transforms`: batched transforms and the exportable :class:`Preprocess`.
* :func:`as_torch_dataset`: a ``torch.utils.data.Dataset`` view for ``DataLoader`` users.
"""

from resnetlab.data.datasets import Split, load_dataset
from resnetlab.data.loader import BatchLoader, SplitDataset, as_torch_dataset, epoch_permutation
from resnetlab.data.sources import BUILTIN, DEFAULT_DATASET, cache_dir
from resnetlab.data.transforms import (
    Preprocess,
    normalize,
    random_crop,
    random_erasing,
    random_flip,
    resize,
    to_float,
)

__all__ = [
    "BUILTIN",
    "DEFAULT_DATASET",
    "BatchLoader",
    "Preprocess",
    "Split",
    "SplitDataset",
    "as_torch_dataset",
    "cache_dir",
    "epoch_permutation",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_erasing",
    "random_flip",
    "resize",
    "to_float",
]
