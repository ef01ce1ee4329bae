"""The D2L ResNet chapter's training, reproduced faithfully: the benchmarks' reference.

The chapter (PyTorch tab) runs::

    lr, num_epochs, batch_size = 0.05, 10, 256
    train_iter, test_iter = d2l.load_data_fashion_mnist(batch_size, resize=96)
    d2l.train_ch6(net, train_iter, test_iter, num_epochs, lr, d2l.try_gpu())

This module is that code without d2l and without torchvision (neither is a dependency):

* data: ``torch.utils.data.DataLoader`` over a map-style dataset that, like torchvision's
  ``FashionMNIST``, turns each uint8 image into a PIL image (mode ``L``) and applies
  ``Compose([Resize(96), ToTensor()])`` (PIL bilinear resize, then uint8 -> float / 255), batch 256,
  ``shuffle=True``, 4 worker processes (``d2l.get_dataloader_workers()``), started again every epoch;
* model: the chapter's ResNet-18 (``create_model("d2l_resnet18")``), fp32, NCHW (default memory
  format), Xavier-uniform init on every Conv2d and Linear weight (``train_ch6``'s ``init_weights``);
* optimisation: ``torch.optim.SGD(net.parameters(), lr=0.05)`` (no momentum, no weight decay),
  ``nn.CrossEntropyLoss()`` (mean), the loop body of ``train_ch6``: ``net.train()``, then per
  batch ``zero_grad``, ``X, y`` to the device, forward, loss, backward, step, metrics.

``resnetlab bench reference`` trains the chapter's way; ``resnetlab bench accuracy-holds``
compares it with resnetlab's ``d2l`` recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from resnetlab.data import Split, load_dataset
from resnetlab.models import create_model

# The chapter's settings, field by field (the tests check the reference loop against these).
CHAPTER: dict[str, Any] = {
    "model": "d2l_resnet18",
    "dataset": "fashion-mnist",
    "lr": 0.05,
    "num_epochs": 10,
    "batch_size": 256,
    "resize": 96,
    "optimizer": "SGD",
    "momentum": 0.0,
    "weight_decay": 0.0,
    "loss": "CrossEntropyLoss(reduction='mean')",
    "init": "xavier_uniform_ on Conv2d and Linear weights",
    "precision": "fp32",
    "memory_format": "contiguous (NCHW)",
    "num_workers": 4,
    "shuffle": True,
    "transform": "Compose([Resize(96), ToTensor()]) per PIL image",
}


# ----------------------------------------------------------------------------------------------
# torchvision's Resize, ToTensor and Compose for PIL images, by hand


class Resize:
    """``torchvision.transforms.Resize(size)`` on a PIL image: bilinear; an int matches the shorter edge."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            ow, oh = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            oh, ow = self.size
        if (ow, oh) == (w, h):
            return img
        return img.resize((ow, oh), Image.BILINEAR)


class ToTensor:
    """``torchvision.transforms.ToTensor()`` on a uint8 PIL image: C x H x W float in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8, copy=True)
        t = torch.from_numpy(arr).view(img.size[1], img.size[0], len(img.getbands()))
        return t.permute(2, 0, 1).contiguous().float().div(255)


class Compose:
    def __init__(self, transforms: list[Callable[[Any], Any]]) -> None:
        self.transforms = transforms

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


def chapter_transform(resize: int | None = 96) -> Compose:
    """``d2l.load_data_fashion_mnist``'s transform: ``[ToTensor()]``, with ``Resize(resize)`` first."""
    trans: list[Callable[[Any], Any]] = [ToTensor()]
    if resize:
        trans.insert(0, Resize(resize))
    return Compose(trans)


class PILDataset(torch.utils.data.Dataset):
    """A split served like torchvision's ``FashionMNIST``: item i is ``(transform(PIL image), int label)``."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = split.images.cpu().numpy()
        self.labels = split.labels.cpu().numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a = self.images[i]  # 1 x H x W -> a mode "L" image, as torchvision's FashionMNIST
        img = Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0))
        return self.transform(img), int(self.labels[i])


def load_data(
    train: Split, test: Split, batch_size: int = 256, resize: int | None = 96, num_workers: int = 4
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """``d2l.load_data_fashion_mnist(batch_size, resize)``: (train_iter, test_iter) DataLoaders."""
    trans = chapter_transform(resize)
    return (
        torch.utils.data.DataLoader(PILDataset(train, trans), batch_size, shuffle=True, num_workers=num_workers),
        torch.utils.data.DataLoader(PILDataset(test, trans), batch_size, shuffle=False, num_workers=num_workers),
    )


class PILBatchesInResnetlabOrder:
    """A control, not the chapter: the chapter's per-image PIL transform over resnetlab's batch order.

    The same batches, in the same order, as ``resnetlab train --seed S`` (its ``BatchLoader``), each
    image through :func:`chapter_transform`. Trained with :func:`train_ch6`, it differs from resnetlab
    only in the pixels (PIL resizes and rounds to uint8; resnetlab resizes in float), and from the
    reference only in the order, so ``resnetlab bench accuracy-holds --control`` can tell the two apart.
    Each iteration is the next epoch, as a DataLoader's reshuffle.
    """

    def __init__(self, split: Split, batch_size: int = 256, resize: int | None = 96, seed: int = 0) -> None:
        from resnetlab.data import BatchLoader

        self.dataset = PILDataset(split, chapter_transform(resize))
        self.order = BatchLoader(split, batch_size, shuffle=True, seed=seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.order.indices(self.epoch)
        self.epoch += 1
        for batch in indices.split(self.order.batch_size):
            images, labels = zip(*(self.dataset[i] for i in batch.tolist()))
            yield torch.stack(images), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------
# The network and train_ch6


def init_weights(m: nn.Module) -> None:
    """``train_ch6``'s initialisation."""
    if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721 (the chapter's test, verbatim)
        nn.init.xavier_uniform_(m.weight)


def chapter_net(
    model: str = "d2l_resnet18", num_classes: int = 10, in_chans: int = 1, seed: int | None = 0
) -> nn.Module:
    """The chapter's network, built after ``torch.manual_seed(seed)`` as resnetlab builds its own.

    ``train_ch6`` then re-initialises it (:func:`init_weights`), so with the same seed the reference
    and ``resnetlab train --recipe d2l`` start from the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return create_model(model, num_classes=num_classes, in_chans=in_chans)


def chapter_optimizer(net: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    """``torch.optim.SGD(net.parameters(), lr=lr)``: no momentum, no weight decay."""
    return torch.optim.SGD(net.parameters(), lr=lr)


def accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    """``d2l.accuracy``: the number of correct predictions."""
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def evaluate_accuracy_gpu(net: nn.Module, data_iter: torch.utils.data.DataLoader, device: torch.device) -> float:
    """``d2l.evaluate_accuracy_gpu``."""
    net.eval()
    correct, total = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            X, y = X.to(device), y.to(device)
            correct += accuracy(net(X), y)
            total += y.numel()
    return correct / total


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> tuple[float, float, int]:
    """One iteration of ``train_ch6``'s inner loop -> (loss sum, correct, examples)."""
    optimizer.zero_grad()
    X, y = X.to(device), y.to(device)
    y_hat = net(X)
    l = loss(y_hat, y)  # noqa: E741 (the chapter's name)
    l.backward()
    optimizer.step()
    with torch.no_grad():
        return float(l * X.shape[0]), accuracy(y_hat, y), X.shape[0]


def forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch, a fresh iterator (fresh workers) per epoch, as ``train_ch6`` does."""
    while True:
        yield from loader


class ReferenceTrainer:
    """The chapter's loop, one step at a time (for the benchmarks): ``step()`` -> images trained."""

    def __init__(
        self,
        train: Split,
        *,
        model: str = "d2l_resnet18",
        batch_size: int = 256,
        resize: int | None = 96,
        lr: float = 0.05,
        num_workers: int = 4,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.config = {
            **CHAPTER,
            "model": model,
            "batch_size": batch_size,
            "resize": resize,
            "lr": lr,
            "num_workers": num_workers,
            "seed": seed,
        }
        self.net = chapter_net(model, len(train.classes), train.images.shape[1], seed)
        self.net.apply(init_weights)  # as train_ch6
        self.net.to(self.device)
        self.optimizer = chapter_optimizer(self.net, lr)
        self.loss = nn.CrossEntropyLoss()
        self.loader = torch.utils.data.DataLoader(
            PILDataset(train, chapter_transform(resize)), batch_size, shuffle=True, num_workers=num_workers
        )
        self._batches = forever(self.loader)

    def step(self) -> int:
        self.net.train()
        X, y = next(self._batches)
        _, _, n = train_step(self.net, self.optimizer, self.loss, X, y, self.device)
        return n


def train_ch6(
    net: nn.Module,
    train_iter: Iterable[tuple[torch.Tensor, torch.Tensor]],
    test_iter: torch.utils.data.DataLoader,
    num_epochs: int,
    lr: float,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``d2l.train_ch6`` without the plot: Xavier init, SGD, CE; returns the final figures and history."""
    net.apply(init_weights)
    net.to(device)
    optimizer = chapter_optimizer(net, lr)
    loss = nn.CrossEntropyLoss()
    history = []
    compute, seen = 0.0, 0
    for epoch in range(num_epochs):
        metric = [0.0, 0.0, 0]
        net.train()
        t_epoch = time.perf_counter()
        for X, y in train_iter:
            t0 = time.perf_counter()
            for i, v in enumerate(train_step(net, optimizer, loss, X, y, device)):
                metric[i] += v
            compute += time.perf_counter() - t0
        seconds = time.perf_counter() - t_epoch
        seen += metric[2]
        test_acc = evaluate_accuracy_gpu(net, test_iter, device)
        row = {
            "epoch": epoch + 1,
            "train_loss": metric[0] / metric[2],
            "train_acc": metric[1] / metric[2],
            "test_acc": test_acc,
            "images_per_s": metric[2] / seconds,
            "seconds": seconds,
        }
        history.append(row)
        log(
            f"epoch {epoch + 1}/{num_epochs}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
            f"test acc {test_acc:.3f}, {row['images_per_s']:.1f} examples/sec, {seconds:.1f} s"
        )
    last = history[-1]
    log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}")
    log(f"{seen / compute:.1f} examples/sec on {device}")
    return {**last, "compute_images_per_s": seen / compute, "history": history}


def run_reference(
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 256,
    resize: int | None = 96,
    num_workers: int = 4,
    seed: int = 0,
    subset: int = 0,
    model: str = "d2l_resnet18",
    dataset: str = "fashion-mnist",
    data_root: str | None = None,
    device: str = "auto",
    resnetlab_order: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the chapter's way end to end; returns train_ch6's figures.

    ``resnetlab_order=True`` is the control :class:`PILBatchesInResnetlabOrder`: the training batches
    come in resnetlab's order for ``seed`` instead of the DataLoader's shuffle.
    """
    from resnetlab.device import resolve_device
    from resnetlab.train.setup import seeded_subset

    dev = resolve_device(device)
    train, test = load_dataset(dataset, root=data_root)
    if subset:  # the same images `resnetlab train --subset N --seed S` trains on
        train = seeded_subset(train, subset, seed)
    train_iter, test_iter = load_data(train, test, batch_size, resize, num_workers)
    if resnetlab_order:
        train_iter = PILBatchesInResnetlabOrder(train, batch_size, resize, seed)
    net = chapter_net(model, len(train.classes), train.images.shape[1], seed=seed)
    return train_ch6(net, train_iter, test_iter, epochs, lr, dev, log=log)


def run_reference_bench(args: argparse.Namespace) -> int:
    """Train the D2L chapter's ResNet-18 exactly the chapter's way (no torchvision); print train_ch6's lines.

    Args:
        args: the parsed flags of ``resnetlab bench reference``: ``epochs``, ``lr``, ``batch_size``,
            ``resize``, ``workers`` and ``model`` (None: the chapter's, see :data:`CHAPTER`), ``seed``,
            ``subset``, ``dataset``, ``data_root``, ``device`` and ``json``.

    Returns:
        0.
    """
    from resnetlab.bench.machine import cpu_line
    from resnetlab.device import cpu_info

    chapter = {
        "epochs": CHAPTER["num_epochs"],
        "lr": CHAPTER["lr"],
        "batch_size": CHAPTER["batch_size"],
        "resize": CHAPTER["resize"],
        "workers": CHAPTER["num_workers"],
        "model": CHAPTER["model"],
    }
    a = {k: chapter[k] if getattr(args, k) is None else getattr(args, k) for k in chapter}
    print(cpu_line(cpu_info()))
    result = run_reference(
        epochs=a["epochs"],
        lr=a["lr"],
        batch_size=a["batch_size"],
        resize=a["resize"] or None,
        num_workers=a["workers"],
        seed=args.seed,
        subset=args.subset,
        model=a["model"],
        dataset=args.dataset,
        data_root=args.data_root,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result))
    return 0
