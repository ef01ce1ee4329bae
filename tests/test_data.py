"""Datasets: the real Fashion-MNIST, synthetic IDX / CIFAR-10 / image folders, lookup order, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import (  # noqa: F401  (fixtures)
    REAL_FASHION,
    isolated,
    make_cifar_files,
    no_system,
    write_cifar_folder,
    write_cifar_tar,
    write_idx_dataset,
)
from resnetlab.cli import main
from resnetlab.data import Split, load_dataset, sources
from resnetlab.errors import DataError, UsageError

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# ------------------------------------------------------------------------------ real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist), loaded once, via the sub-folder layout."""
    assert REAL_FASHION.is_dir(), "install dataset-fashion-mnist (make data does)"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RESNETLAB_DATA", raising=False)
        return load_dataset("fashion-mnist", root=REAL_FASHION.parent, download=False)


def test_real_fashion_mnist(fashion):
    train, test = fashion
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and test.images.is_contiguous()
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    assert train.classes == FASHION_CLASSES and test.classes == FASHION_CLASSES
    assert train.name == "fashion-mnist" and train.image_shape == (1, 28, 28)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # the first training image is an ankle boot (label 9), as in every copy of the dataset
    assert int(train.labels[0]) == 9 and int(test.labels[0]) == 9


def test_loading_fashion_mnist_peak_rss_under_400mb(tmp_path):
    """Peak RSS of a fresh process that imports torch and loads the whole dataset (torch alone is ~220 MB)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from resnetlab.data import load_dataset\n"
        f"tr, te = load_dataset('fashion-mnist', root={str(REAL_FASHION)!r}, download=False)\n"
        "assert len(tr) == 60000\n"
        # VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's (pytest's) peak into
        # the child's ru_maxrss across exec, while VmHWM belongs to the new address space alone.
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    peak_mb = int(out.stdout.split()[-1]) / 1024  # VmHWM is in kB
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"


def test_real_fashion_found_in_system_and_flat_root(isolated):
    loc, _ = sources.locate("fashion-mnist")
    assert loc is not None and loc.directory == REAL_FASHION and loc.label == "system" and loc.form == "gz"
    loc, _ = sources.locate("fashion-mnist", root=REAL_FASHION)  # flat layout
    assert loc is not None and loc.label == "--root"


def test_real_fashion_verifies(isolated):
    loc, _ = sources.locate("fashion-mnist")
    checks = sources.check_location(loc)
    assert [c.status for c in checks] == ["ok"] * 4, checks


# ---------------------------------------------------------------------------------------- Split


def test_split_helpers():
    images = torch.arange(5 * 1 * 2 * 2, dtype=torch.uint8).reshape(5, 1, 2, 2)
    s = Split(images, torch.tensor([0, 1, 1, 2, 1]), ["a", "b", "c"], "toy")
    assert len(s) == 5 and s.class_counts() == [1, 3, 1] and s.num_classes == 3
    sub = s.subset([4, 0])
    assert torch.equal(sub.images, images[[4, 0]]) and sub.labels.tolist() == [1, 0] and sub.classes == ["a", "b", "c"]
    assert sub.class_counts() == [1, 1, 0]
    assert len(s.subset(torch.tensor([], dtype=torch.int64))) == 0
    with pytest.raises(UsageError):
        s.subset([5])
    with pytest.raises(UsageError):
        Split(images.float(), s.labels, s.classes)
    with pytest.raises(UsageError):
        Split(images, s.labels[:4], s.classes)


# ----------------------------------------------------------------------------- synthetic IDX files


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_gz_and_raw(isolated, compressed):
    root = isolated / "data"
    arrays = write_idx_dataset(root / "mnist", compressed=compressed, n_train=30, n_test=10)
    train, test = load_dataset("mnist", root=root, download=False)
    assert train.classes == [str(i) for i in range(10)]
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert train.images.shape == (30, 1, 28, 28) and len(test) == 10


def test_lookup_order_root_env_cache_system(isolated, monkeypatch):
    # four different copies, told apart by their size; each place hides the ones after it
    sysdir, cache, env, root = (isolated / n for n in ("sys", "xdg-cache/resnetlab", "env", "root"))
    write_idx_dataset(sysdir, n_train=11)
    monkeypatch.setitem(sources.SYSTEM_DIRS, "mnist", [str(sysdir)])
    assert len(load_dataset("mnist", download=False)[0]) == 11
    write_idx_dataset(cache / "mnist", n_train=12)
    assert len(load_dataset("mnist", download=False)[0]) == 12
    write_idx_dataset(env, n_train=13)  # flat layout
    monkeypatch.setenv("RESNETLAB_DATA", str(env))
    assert len(load_dataset("mnist", download=False)[0]) == 13
    write_idx_dataset(root / "mnist", n_train=14)
    write_idx_dataset(root, n_train=15)  # the sub-folder wins over the flat layout in one place
    assert len(load_dataset("mnist", root=root, download=False)[0]) == 14


def test_a_named_root_without_the_data_is_a_warning_not_silence(isolated, monkeypatch, capsys):
    sysdir = isolated / "sys"
    write_idx_dataset(sysdir, n_train=11)
    monkeypatch.setitem(sources.SYSTEM_DIRS, "mnist", [str(sysdir)])
    typo = isolated / "typo"
    # named neutrally: the root is --root of `data` but --data-root of train and eval
    with pytest.warns(
        UserWarning,
        match=rf"^the data root {typo} holds no usable mnist .*; using {sysdir} \(system\)\. Fix or drop it$",
    ):
        assert len(load_dataset("mnist", root=typo, download=False)[0]) == 11
    monkeypatch.setenv("RESNETLAB_DATA", str(typo))
    assert main(["data", "info", "mnist"]) == 0  # the CLI shows it as one line
    err = capsys.readouterr().err
    assert err.startswith(f"resnetlab: warning: RESNETLAB_DATA={typo} holds no usable mnist") and err.count("\n") == 1


def test_cache_respects_xdg_and_home(isolated, monkeypatch):
    assert sources.cache_dir() == isolated / "xdg-cache" / "resnetlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.cache_dir() == isolated / "home" / ".cache" / "resnetlab"
    write_idx_dataset(isolated / "home" / ".cache" / "resnetlab" / "mnist", n_train=7)
    monkeypatch.setitem(sources.SYSTEM_DIRS, "mnist", [])
    assert len(load_dataset("mnist", download=False)[0]) == 7


def test_incomplete_copy_is_skipped_and_reported(no_system):
    root = no_system / "root"
    write_idx_dataset(root / "mnist")
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"incomplete: missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", root=root, download=False)


def test_builtin_rejects_folder_options_and_unknown_names(isolated):
    with pytest.raises(UsageError):
        load_dataset("fashion-mnist", image_size=32)
    with pytest.raises(UsageError, match="unknown dataset"):
        load_dataset("imagenet")


# ------------------------------------------------------------------------------------- CIFAR-10


def _check_cifar(train, test, expected_train, expected_test, classes):
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected_train[0])
    assert np.array_equal(train.labels.numpy(), expected_train[1])
    assert np.array_equal(test.images.numpy(), expected_test[0])
    assert train.classes == classes


def test_cifar_tar_gz(no_system):
    files, tr, te = make_cifar_files()
    write_cifar_tar(no_system / "root" / "cifar10" / "cifar-10-binary.tar.gz", files)
    train, test = load_dataset("cifar10", root=no_system / "root", download=False)
    _check_cifar(train, test, tr, te, list(sources.CIFAR10_CLASSES))


def test_cifar_extracted_folder_and_meta(no_system):
    files, tr, te = make_cifar_files(meta=b"a0\na1\na2\na3\na4\na5\na6\na7\na8\na9\n")
    write_cifar_folder(no_system / "root" / "cifar-10-batches-bin", files)  # flat place, extracted folder
    train, test = load_dataset("cifar10", root=no_system / "root", download=False)
    _check_cifar(train, test, tr, te, [f"a{i}" for i in range(10)])


def test_cifar_bin_files_directly_without_meta(no_system):
    files, tr, te = make_cifar_files(meta=None)
    write_cifar_folder(no_system / "root" / "cifar10", files)
    train, test = load_dataset("cifar10", root=no_system / "root", download=False)
    _check_cifar(train, test, tr, te, list(sources.CIFAR10_CLASSES))


# -------------------------------------------------------------------------------- image folders


def _img(path, size, mode, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)  # mode from the shape: L or RGB


def test_folder_mixed_formats_sizes_and_modes(tmp_path):
    root = tmp_path / "shapes"
    for i in range(10):
        _img(root / "cat" / f"{i}.png", (20, 16), "RGB", 10 + i)
        _img(root / "dog" / f"{i}.jpg", (20, 16) if i < 8 else (33, 7), "L", 200)
    (root / "dog" / "notes.txt").write_text("ignored")
    train, test = load_dataset(f"folder:{root}")
    assert train.classes == ["cat", "dog"]
    assert train.images.shape[1:] == (3, 16, 20)  # most common size (h=16, w=20); RGB as some are RGB
    assert len(train) + len(test) == 20 and test.class_counts() == [1, 1]  # 10% of each class
    # a grey JPEG converted to RGB has three equal channels
    dog = train.images[train.labels == 1]
    assert torch.equal(dog[:, 0], dog[:, 1]) and abs(int(dog[0, 0, 8, 10]) - 200) <= 2


def test_folder_explicit_size_channels_and_name_options(tmp_path):
    root = tmp_path / "f"
    for c in ("a", "b", "c"):
        for i in range(5):
            _img(root / c / f"{i}.png", (8 + i, 8), "RGB", 50)
    train, test = load_dataset(f"folder:{root}", image_size=12, channels=1)
    assert train.images.shape[1:] == (1, 12, 12)
    train2, test2 = load_dataset(f"folder:{root}?size=6x10&channels=3&holdout=0.4")
    assert train2.images.shape[1:] == (3, 6, 10) and test2.class_counts() == [2, 2, 2]
    with pytest.raises(UsageError):
        load_dataset(f"folder:{root}", channels=2)


def test_folder_all_grey_is_one_channel_and_holdout_is_seeded_and_stratified(tmp_path):
    root = tmp_path / "g"
    for c in ("x", "y"):
        for i in range(30):
            _img(root / c / f"{i:02d}.png", (5, 5), "L", i)
    train, test = load_dataset(f"folder:{root}")
    assert train.images.shape[1:] == (1, 5, 5) and test.class_counts() == [3, 3] and train.class_counts() == [27, 27]
    again = load_dataset(f"folder:{root}")[1]
    other = load_dataset(f"folder:{root}", seed=1)[1]
    assert torch.equal(again.images, test.images)
    assert not torch.equal(other.images, test.images)
    # disjoint and together the whole set: the pixel value identifies the image within its class
    keys = lambda s: {(int(label), int(img[0, 0, 0])) for img, label in zip(s.images, s.labels)}  # noqa: E731
    assert not (keys(train) & keys(test)) and len(keys(train) | keys(test)) == 60


def test_folder_train_test_subfolders(tmp_path):
    root = tmp_path / "tt"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("b", "a"):
            for i in range(n):
                _img(root / split / c / f"{i}.png", (6, 6), "RGB", 1)
    _img(root / "val" / "a" / "x.png", (6, 6), "RGB", 1)
    train, test = load_dataset(f"folder:{root}")
    assert train.classes == ["a", "b"] and train.class_counts() == [4, 4] and test.class_counts() == [3, 2]


# --------------------------------------------------------------------------------------------- CLI


def test_cli_info_all_lists_places_for_missing(no_system, capsys):
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    for name in ("fashion-mnist", "mnist", "cifar10"):
        assert f"{name}: not found" in out
    assert str(no_system / "xdg-cache" / "resnetlab" / "mnist") in out and "no-system" in out


def test_cli_info_and_verify_synthetic(isolated, capsys):
    write_idx_dataset(isolated / "r" / "mnist", n_train=20, n_test=10)
    assert main(["data", "info", "mnist", "--root", str(isolated / "r")]) == 0
    out = capsys.readouterr().out
    assert "found in" in out and "train 20, test 10, image 1x28x28" in out
    # no published digest matches synthetic files: verify reports the mismatch and exits 2
    assert main(["data", "verify", "mnist", "--root", str(isolated / "r")]) == 2
    captured = capsys.readouterr()
    assert "mismatch" in captured.out and "checksum mismatch" in captured.err


def test_cli_verify_real_fashion_quiet(isolated, capsys):
    assert main(["data", "verify", "fashion-mnist", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_cli_verify_missing_is_exit_2(no_system, capsys):
    assert main(["data", "verify", "mnist", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


def test_cli_fetch_already_present(isolated, capsys):
    assert main(["data", "fetch", "fashion-mnist"]) == 0
    assert "already present" in capsys.readouterr().out


def test_cli_unverified_cifar_folder_checks_structure(no_system, capsys):
    files, _, _ = make_cifar_files()
    write_cifar_folder(no_system / "r" / "cifar10", files)
    assert main(["data", "verify", "cifar10", "--root", str(no_system / "r")]) == 0
    out = capsys.readouterr().out
    assert "unverified" in out and "structure ok: train 30, test 6" in out


def test_cli_folder_info(tmp_path, capsys):
    for c in ("a", "b"):
        for i in range(3):
            _img(tmp_path / "f" / c / f"{i}.png", (4, 4), "L", 0)
    assert main(["data", "info", f"folder:{tmp_path / 'f'}"]) == 0
    assert "image 1x4x4" in capsys.readouterr().out
    assert main(["data", "fetch", f"folder:{tmp_path / 'f'}"]) == 2


def test_cli_options_may_sit_between_positionals(tmp_path, capsys):
    for c in ("a", "b"):
        for i in range(3):
            _img(tmp_path / "f" / c / f"{i}.png", (4, 4), "L", 0)
    assert main(["data", "info", "--quiet", f"folder:{tmp_path / 'f'}"]) == 0  # was "unrecognized arguments"
    assert capsys.readouterr() == ("", "")
    assert main(["data", "info", "--root", str(tmp_path), f"folder:{tmp_path / 'f'}"]) == 0
    assert "image 1x4x4" in capsys.readouterr().out


def test_folder_16bit_and_palette_images_convert(tmp_path):
    root = tmp_path / "m"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(root / "a" / f"{i}.png")  # 16-bit grey
        Image.fromarray(np.full((6, 6), 128, dtype=np.uint8)).save(root / "b" / f"{i}.png")
    train, test = load_dataset(f"folder:{root}", holdout=0.0)
    assert train.images.shape == (4, 1, 6, 6) and len(test) == 0
    assert int(train.images[0].min()) == 255 and int(train.images[2].max()) == 128
    Image.new("P", (6, 6), 3).save(root / "b" / "p.png")  # a palette image makes the set RGB
    train, _ = load_dataset(f"folder:{root}", holdout=0.0)
    assert train.images.shape[1] == 3
