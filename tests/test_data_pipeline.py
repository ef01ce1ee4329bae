"""The in-memory pipeline: BatchLoader order/resume/sharding, batched transforms, Preprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import REAL_FASHION
from resnetlab.data import (
    BatchLoader,
    Preprocess,
    Split,
    as_torch_dataset,
    normalize,
    random_crop,
    random_erasing,
    random_flip,
    resize,
    to_float,
)
from resnetlab.data.idx import read_idx
from resnetlab.errors import UsageError


def toy_split(n=103, c=1, hw=(4, 4)) -> Split:
    images = (
        (torch.arange(n, dtype=torch.int64) % 256).to(torch.uint8)[:, None, None, None].expand(n, c, *hw).contiguous()
    )
    return Split(images, torch.arange(n) % 10, [str(i) for i in range(10)], "toy")


def order(loader, epoch, start=0):
    """Sample ids (the labels of toy_split are not unique; the pixel encodes id % 256) of an epoch."""
    return [int(v) for xb, _ in loader.batches(epoch, start) for v in xb[:, 0, 0, 0]]


# ------------------------------------------------------------------------------------- BatchLoader


def test_unshuffled_order_and_lengths():
    s = toy_split(10)
    bl = BatchLoader(s, 4)
    assert len(bl) == 3 and bl.num_samples_per_epoch == 10
    batches = list(bl)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), s.images)
    assert batches[0][0].dtype == torch.uint8 and batches[0][1].dtype == torch.int64
    bl = BatchLoader(s, 4, drop_last=True)
    assert len(bl) == 2 and bl.num_samples_per_epoch == 8 and len(list(bl)) == 2


def test_shuffle_is_a_pure_function_of_seed_and_epoch():
    s = toy_split(200)
    a, b = BatchLoader(s, 32, shuffle=True, seed=3), BatchLoader(s, 32, shuffle=True, seed=3)
    assert order(a, 0) == order(b, 0) and order(a, 5) == order(b, 5)
    assert sorted(order(a, 0)) == sorted(range(200))
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(BatchLoader(s, 32, shuffle=True, seed=4), 0)
    assert order(a, 0) != list(range(200))
    # any int seed: seed * 1_000_003 + epoch is taken into torch's seed range (it overflowed past ~1.8e13)
    huge = BatchLoader(s, 32, shuffle=True, seed=2**60)
    assert sorted(order(huge, 1)) == sorted(range(200)) and order(huge, 1) != order(huge, 2)
    # __iter__ follows set_epoch and does not advance on its own
    first = [int(v) for x, _ in a for v in x[:, 0, 0, 0]]
    assert first == order(a, 0) == [int(v) for x, _ in a for v in x[:, 0, 0, 0]]
    a.set_epoch(7)
    assert [int(v) for x, _ in a for v in x[:, 0, 0, 0]] == order(b, 7)


@pytest.mark.parametrize("start", [0, 1, 3, 6, 7])
def test_resume_mid_epoch_equals_the_tail(start):
    s = toy_split(200)
    bl = BatchLoader(s, 32, shuffle=True, seed=11)
    full = list(bl.batches(2))
    tail = list(bl.batches(2, start=start))
    assert len(tail) == len(full) - start
    for (x1, y1), (x2, y2) in zip(full[start:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("n,ws,bs", [(103, 4, 8), (100, 4, 5), (7, 3, 2), (10, 3, 3)])
def test_eval_shards_are_disjoint_and_cover(n, ws, bs):
    s = toy_split(n)
    for epoch in (0, 1):
        ids = [order(BatchLoader(s, bs, shuffle=True, seed=1, world_size=ws, rank=r), epoch) for r in range(ws)]
        flat = [i for shard in ids for i in shard]
        assert sorted(flat) == list(range(n))  # union is the set, no duplicates
        assert max(map(len, ids)) - min(map(len, ids)) <= 1
        loaders = [BatchLoader(s, bs, world_size=ws, rank=r) for r in range(ws)]
        assert [bl.num_samples_per_epoch for bl in loaders] == list(map(len, ids))


@pytest.mark.parametrize("n,ws,bs", [(103, 4, 8), (100, 4, 5), (10, 3, 2)])
def test_train_shards_equal_full_batches_disjoint(n, ws, bs):
    s = toy_split(n)
    loaders = [BatchLoader(s, bs, shuffle=True, seed=2, drop_last=True, world_size=ws, rank=r) for r in range(ws)]
    assert len({len(bl) for bl in loaders}) == 1 and len(loaders[0]) == (n // ws) // bs
    for epoch in (0, 3):
        ids = [order(bl, epoch) for bl in loaders]
        assert all(len(i) == len(loaders[0]) * bs == bl.num_samples_per_epoch for i, bl in zip(ids, loaders))
        flat = [i for shard in ids for i in shard]
        assert len(set(flat)) == len(flat)
        # the shards are cut from the same epoch permutation as a single process would use
        single = order(BatchLoader(s, 1, shuffle=True, seed=2), epoch)
        assert set(flat) <= set(single[: (n // ws) * ws])


def test_loader_rejects_bad_arguments():
    s = toy_split(10)
    for kwargs in (
        {"batch_size": 0},
        {"batch_size": 2, "rank": 2, "world_size": 2},
        {"batch_size": 2, "world_size": 0},
        {"batch_size": 2, "device": "nonsense"},
    ):
        with pytest.raises(UsageError):
            BatchLoader(s, **kwargs)
    with pytest.raises(UsageError):
        list(BatchLoader(s, 2).batches(0, start=-1))


def test_torch_dataset_view_with_dataloader():
    s = toy_split(20, c=3)
    ds = as_torch_dataset(s)
    assert len(ds) == 20
    x, y = ds[5]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and y == 5
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert torch.equal(xb, to_float(s.images[:8])) and yb.tolist() == s.labels[:8].tolist()
    ds2 = as_torch_dataset(s, transform=lambda t: resize(t, 6))
    assert ds2[0][0].shape == (3, 6, 6)


# -------------------------------------------------------------------------------------- transforms


def test_to_float_normalize_shapes_and_ranges():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 3).expand(2, 3, 2, 3)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.shape == x.shape and float(f.min()) == 0.0 and float(f.max()) == 1.0
    assert to_float(x, torch.float64).dtype == torch.float64
    n = normalize(f, [0.5, 0.5, 0.5], [0.5, 0.25, 1.0])
    assert torch.allclose(n[:, 0], f[:, 0] * 2 - 1) and torch.allclose(n[:, 1], (f[:, 1] - 0.5) * 4)
    assert torch.allclose(normalize(f[0], 0.5, 0.5), f[0] * 2 - 1)  # one C x H x W image, scalars
    with pytest.raises(UsageError):
        to_float(f)
    with pytest.raises(UsageError):
        normalize(f, [0.5, 0.5], [1, 1])
    with pytest.raises(UsageError):
        normalize(f, 0.0, 0.0)
    with pytest.raises(UsageError):
        resize(x, 8)  # uint8: to_float first


@pytest.fixture(scope="module")
def fashion_test_images():
    return torch.from_numpy(read_idx(REAL_FASHION / "t10k-images-idx3-ubyte.gz", ndim=3)[:300]).unsqueeze(1)


def _pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for img in images[:, 0].numpy():
        pil = Image.fromarray(img).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    return torch.stack(out).unsqueeze(1)


@pytest.mark.parametrize("size", [96, 224, 14])
def test_resize_matches_pil_on_real_fashion_mnist(fashion_test_images, size):
    ours = resize(to_float(fashion_test_images), size)
    ref = _pil_resize(fashion_test_images, size)
    assert ours.shape == (300, 1, size, size) and ours.dtype == torch.float32
    mad = (ours - ref).abs().mean().item()
    assert mad < 1 / 255, mad
    assert float(ours.min()) >= -1e-6 and float(ours.max()) <= 1 + 1e-6
    if size == 96:
        # without antialiasing a shrink would differ; growing is the same either way
        assert torch.allclose(resize(to_float(fashion_test_images), 96, antialias=False), ours, atol=1e-6)


def test_resize_shapes():
    x = torch.rand(2, 3, 10, 20)
    assert resize(x, (5, 8)).shape == (2, 3, 5, 8) and resize(x[0], 7).shape == (3, 7, 7)
    assert resize(x, (10, 20)) is x
    with pytest.raises(UsageError):
        resize(x, 0)


def test_random_crop_is_a_shifted_window():
    x = torch.rand(50, 3, 8, 8)
    out = random_crop(x, 2, torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(5)  # replay the documented draws: row offsets, then column offsets
    oy, ox = torch.randint(0, 5, (50,), generator=g), torch.randint(0, 5, (50,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(50):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8])
    assert len({(int(a), int(b)) for a, b in zip(oy, ox)}) > 5
    assert torch.equal(random_crop(x, 2, torch.Generator().manual_seed(5)), out)


def test_random_flip():
    x = torch.rand(200, 1, 5, 6)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x)]
    same = [bool(torch.equal(o, i)) for o, i in zip(out, x)]
    assert all(a != b for a, b in zip(flipped, same)) and 60 < sum(flipped) < 140
    assert torch.equal(random_flip(x, torch.Generator().manual_seed(1)), out)
    assert torch.equal(random_flip(x, torch.Generator(), p=0.0), x)
    assert torch.equal(random_flip(x, torch.Generator(), p=1.0), x.flip(-1))


def test_random_erasing_rectangles():
    x = torch.rand(300, 3, 28, 28)
    out = random_erasing(x, torch.Generator().manual_seed(2), p=1.0, value=-1.0)
    assert out.shape == x.shape
    erased = 0
    for o, i in zip(out, x):
        m = o == -1
        assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])  # same rectangle in every channel
        assert torch.equal(o[~m], i[~m])
        if m.any():
            erased += 1
            rows, cols = m[0].any(1).nonzero(), m[0].any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert int(m[0].sum()) == h * w  # a filled rectangle
            assert 0.02 * 784 * 0.5 <= h * w <= 0.33 * 784 * 1.3
    assert erased > 250
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(2), p=1.0, value=-1.0), out)
    assert torch.equal(random_erasing(x, torch.Generator(), p=0.0), x)
    half = random_erasing(x, torch.Generator().manual_seed(3), p=0.5, value=-1.0)
    assert 100 < sum(bool((o == -1).any()) for o in half) < 200


def test_random_transforms_need_a_cpu_generator():
    with pytest.raises(UsageError):
        random_flip(torch.rand(2, 1, 3, 3), None)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- Preprocess


def test_preprocess_matches_functions_and_exports():
    pre = Preprocess(14, [0.3], [0.2]).eval()
    x = torch.rand(3, 1, 28, 28)
    expected = normalize(resize(x, 14), [0.3], [0.2])
    assert torch.allclose(pre(x), expected, atol=1e-6)
    assert torch.allclose(torch.fx.symbolic_trace(pre)(x), expected, atol=1e-6)
    assert torch.allclose(torch.export.export(pre, (x,)).module()(x), expected, atol=1e-6)
    again = Preprocess.from_config(pre.config())
    assert torch.allclose(again(x), expected) and Preprocess(None, 0.5, 0.5)(x).shape == x.shape
    assert set(pre.state_dict()) == {"mean", "std"}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_preprocess_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pre = Preprocess(14, [0.3], [0.2]).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.onnx.export(pre, (x,), dynamo=True, opset_version=18).save(str(tmp_path / "p.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(y - pre(x).detach().numpy()).max() < 1e-4
