"""In-memory batching on the training device, reproducible and resumable.

``BatchLoader`` keeps the whole split (uint8) on ``device`` and each step takes one batch with a
single ``index_select`` of a permutation: no worker processes, no per-sample Python, no host to
device copy per step.

Order. Epoch ``e``'s permutation is a pure function of ``(seed, e)``: ``torch.randperm`` with a CPU
generator seeded ``seed * 1_000_003 + e``. ``batches(e, start=k)`` yields exactly the steps k.. of
``batches(e)``, which is what a resumed run needs to continue bit-identically mid-epoch.
``__iter__`` runs the current epoch (set with ``set_epoch``, default 0); like
``DistributedSampler`` it does *not* advance by itself: call ``set_epoch(e)`` every epoch (or use
``batches(e)``) or every epoch will have the same order.

Sharding (``world_size > 1``). All ranks compute the same epoch permutation and rank ``r`` takes the
strided shard ``perm[r::world_size]``:

* ``drop_last=True`` (training): the permutation is first cut to a multiple of ``world_size``
  (the last ``N % world_size`` samples of that epoch's order are dropped), and each rank keeps only
  full batches, so every rank has exactly ``len(loader)`` equal batches (needed by DDP); the dropped
  samples change from epoch to epoch when shuffling.
* ``drop_last=False`` (evaluation): the shards' union is exactly the split, with no duplicates;
  ranks may differ by one sample and so by at most one (short) batch: gather the results after
  the loop, not per step.

Single-process ``drop_last`` only drops the final partial batch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from resnetlab.data.datasets import Split
from resnetlab.errors import UsageError

SEED_STRIDE = 1_000_003


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch``: a pure function of (seed, epoch), computed on the CPU."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(
        (seed * SEED_STRIDE + epoch) % 2**64
    )  # torch's seed range; smaller values unchanged
    return torch.randperm(n, generator=g)


class BatchLoader:
    """Batches of (uint8 images N x C x H x W, int64 labels) from a ``Split`` held on ``device``.

    Iterating yields ``(images_uint8, labels)`` on ``device``; it can stand where a DataLoader is
    expected by loops that take ``for x, y in loader`` and ``len(loader)`` (convert with
    :func:`~resnetlab.data.transforms.to_float` and friends on the device).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive int, not {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise UsageError(f"world_size must be a positive int, not {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UsageError(f"rank must be in 0..{world_size - 1}, not {rank!r}")
        if not isinstance(seed, int):
            raise UsageError(f"seed must be an int, not {seed!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise UsageError(f"bad device {device!r}: {err}") from None
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.classes = split.classes
        self.epoch = 0
        n = len(split)
        if self.drop_last:
            per_rank = n // world_size
            self.num_samples_per_epoch = (per_rank // batch_size) * batch_size
            self._len = per_rank // batch_size
        else:
            per_rank = len(range(rank, n, world_size))
            self.num_samples_per_epoch = per_rank
            self._len = -(-per_rank // batch_size)
        self._per_rank = per_rank

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch must be a non-negative int, not {epoch!r}")
        self.epoch = epoch

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch`` in order (CPU int64), before batching."""
        n = len(self.split)
        perm = epoch_permutation(n, self.seed, epoch, self.shuffle)
        if self.drop_last and self.world_size > 1:
            perm = perm[: (n // self.world_size) * self.world_size]
        shard = perm[self.rank :: self.world_size] if self.world_size > 1 else perm
        return shard[: self.num_samples_per_epoch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images_uint8, labels) for steps ``start``, ``start + 1``, ... of ``epoch``."""
        if not isinstance(start, int) or start < 0:
            raise UsageError(f"start must be a non-negative int, not {start!r}")
        if not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch must be a non-negative int, not {epoch!r}")
        idx = self.indices(epoch).to(self.device, non_blocking=True)
        bs = self.batch_size
        for step in range(start, self._len):
            b = idx[step * bs : (step + 1) * bs]
            yield self.images.index_select(0, b), self.labels.index_select(0, b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch)

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.split.name or 'split'}: {len(self.split)} images, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, {len(self)} batches/epoch)"
        )


class SplitDataset(torch.utils.data.Dataset):
    """A map-style ``torch.utils.data.Dataset`` over a ``Split``: item i is (float C x H x W in [0, 1], int label).

    For code that wants a ``DataLoader`` (e.g. with ``num_workers``). ``transform`` (optional) is
    applied to each float image; the batched transforms also accept single C x H x W images.
    Works with worker processes (the tensors are shared, not copied, with fork).
    """

    def __init__(self, split: Split, transform=None) -> None:
        self.split = split
        self.images = split.images.cpu()
        self.labels = split.labels.cpu()
        self.classes = split.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


def as_torch_dataset(split: Split, transform=None) -> SplitDataset:
    """Wrap a ``Split`` as a ``torch.utils.data.Dataset`` of (float C x H x W in [0, 1], int label)."""
    return SplitDataset(split, transform)
