"""Bad input: every case is one DataError line naming the file, exit 2 from the CLI, nothing written."""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_helpers import (  # noqa: F401  (fixtures)
    gz,
    idx_bytes,
    isolated,
    make_cifar_files,
    make_idx_arrays,
    no_system,
    snapshot,
    write_cifar_folder,
    write_cifar_tar,
    write_idx_dataset,
)
from resnetlab.cli import main
from resnetlab.data import load_dataset
from resnetlab.data.idx import parse_idx, read_idx
from resnetlab.errors import DataError


def _expect_data_error(capsys, isolated, name: str, root, culprit: str, match: str) -> None:
    """load_dataset raises a DataError naming ``culprit``; the CLI exits 2 with one line; no file appears."""
    before = snapshot(isolated)
    with pytest.raises(DataError) as info:
        load_dataset(name, root=root, download=False)
    msg = str(info.value)
    assert "\n" not in msg and culprit in msg, msg
    assert __import__("re").search(match, msg), msg
    capsys.readouterr()
    assert main(["data", "info", name] + (["--root", str(root)] if root is not None else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resnetlab: error: ") and culprit in err
    assert snapshot(isolated) == before


def _bad_mnist(root, stem: str, data: bytes, compressed: bool = True):
    write_idx_dataset(root / "mnist", compressed=compressed)
    path = root / "mnist" / (f"{stem}.gz" if compressed else stem)
    path.write_bytes(gz(data) if compressed and data[:2] != b"\x1f\x8b" else data)
    return path


IMG, LAB = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_file(no_system, capsys, compressed):
    full = idx_bytes(make_idx_arrays()[IMG])
    path = _bad_mnist(no_system / "r", IMG, full[:-100], compressed)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "truncated")


def test_truncated_gzip_stream(no_system, capsys):
    data = gz(idx_bytes(make_idx_arrays()[IMG]))
    path = _bad_mnist(no_system / "r", IMG, data[: len(data) // 2])
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "corrupt or truncated gzip")


def test_wrong_magic(no_system, capsys):
    good = idx_bytes(make_idx_arrays()[LAB])
    path = _bad_mnist(no_system / "r", LAB, b"\x00\x00\x08\x03" + good[4:])  # a 3-d header in a label file
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "wrong magic number 0x00000803")


def test_wrong_magic_type(no_system, capsys):
    path = _bad_mnist(no_system / "r", LAB, b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\0" * 4)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "float32, only ubyte")


def test_header_counts_disagree_with_payload(no_system, capsys):
    arr = make_idx_arrays()[IMG]
    data = idx_bytes(arr) + b"\x00" * 28 * 28  # one image more than the header says
    path = _bad_mnist(no_system / "r", IMG, data)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "header counts disagree")
    forged = b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00" * 100
    path = _bad_mnist(no_system / "r2", IMG, forged, compressed=False)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r2", str(path), "header counts disagree")


def test_labels_out_of_range(no_system, capsys):
    labels = make_idx_arrays()[LAB].copy()
    labels[7] = 10
    path = _bad_mnist(no_system / "r", LAB, idx_bytes(labels))
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "label 10 at index 7 is out of range")


def test_image_and_label_counts_differ(no_system, capsys):
    labels = make_idx_arrays()[LAB][:-1]
    _bad_mnist(no_system / "r", LAB, idx_bytes(labels))
    _expect_data_error(
        capsys, no_system, "mnist", no_system / "r", "train-labels-idx1-ubyte", "40 images but .* 39 labels"
    )


def test_empty_file(no_system, capsys):
    path = _bad_mnist(no_system / "r", IMG, b"", compressed=False)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "empty file")


def test_corrupt_gzip(no_system, capsys):
    data = bytearray(gz(idx_bytes(make_idx_arrays()[IMG])))
    data[len(data) // 2] ^= 0xFF  # damage the deflate stream (or its CRC check)
    path = _bad_mnist(no_system / "r", IMG, bytes(data))
    _expect_data_error(capsys, no_system, "mnist", no_system / "r", str(path), "corrupt or truncated gzip")
    path = _bad_mnist(no_system / "r2", IMG, b"\x1f\x8b" + b"not gzip at all", compressed=True)
    _expect_data_error(capsys, no_system, "mnist", no_system / "r2", str(path), "corrupt or truncated gzip")


def test_checksum_mismatch(no_system, capsys, monkeypatch):
    from resnetlab.data import sources

    write_idx_dataset(no_system / "r" / "fashion-mnist")  # looks like Fashion-MNIST, is not
    before = snapshot(no_system)
    assert main(["data", "verify", "fashion-mnist", "--root", str(no_system / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checksum mismatch" in err and "train-images-idx3-ubyte.gz" in err
    assert snapshot(no_system) == before
    path = no_system / "r" / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    assert sources.check_file(path, sources.DATASETS["fashion-mnist"].files[1]).status == "mismatch"


def test_cifar_truncated_and_bad_label(no_system, capsys):
    files, _, _ = make_cifar_files()
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-5]
    write_cifar_folder(no_system / "r" / "cifar10", files)
    _expect_data_error(capsys, no_system, "cifar10", no_system / "r", "data_batch_3.bin", "truncated")
    files, _, _ = make_cifar_files()
    bad = bytearray(files["test_batch.bin"])
    bad[3073 * 2] = 11
    files["test_batch.bin"] = bytes(bad)
    write_cifar_tar(no_system / "r2" / "cifar-10-binary.tar.gz", files)
    _expect_data_error(capsys, no_system, "cifar10", no_system / "r2", "test_batch.bin", "label 11 of record 2")


def test_cifar_corrupt_archive(no_system, capsys):
    files, _, _ = make_cifar_files()
    path = write_cifar_tar(no_system / "r" / "cifar-10-binary.tar.gz", files)
    path.write_bytes(path.read_bytes()[:3000])
    _expect_data_error(capsys, no_system, "cifar10", no_system / "r", str(path), "corrupt or truncated archive")
    with tarfile.open(path, "w:gz"):
        pass  # a valid, empty archive
    _expect_data_error(capsys, no_system, "cifar10", no_system / "r", str(path), "missing data_batch_1.bin")


def _write_images(root, n=3):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / f"{i}.png")


def test_folder_unreadable_image(tmp_path, capsys):
    _write_images(tmp_path / "f")
    bad = tmp_path / "f" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _expect_data_error(capsys, tmp_path, f"folder:{tmp_path / 'f'}", None, str(bad), "unreadable image")


def test_folder_truncated_jpeg(tmp_path, capsys):
    _write_images(tmp_path / "f")
    bad = tmp_path / "f" / "a" / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])  # the header reads, the pixels do not
    _expect_data_error(capsys, tmp_path, f"folder:{tmp_path / 'f'}", None, str(bad), "unreadable image")


def test_folder_empty_class(tmp_path, capsys):
    _write_images(tmp_path / "f")
    (tmp_path / "f" / "c").mkdir()
    (tmp_path / "f" / "c" / "readme.txt").write_text("no images")
    _expect_data_error(capsys, tmp_path, f"folder:{tmp_path / 'f'}", None, str(tmp_path / "f" / "c"), "empty class")


def test_folder_with_one_class_is_refused(tmp_path, capsys):
    one = tmp_path / "one"  # a classifier of one class trained to a meaningless 100%
    _write_images(one)
    shutil.rmtree(one / "b")
    _expect_data_error(
        capsys,
        tmp_path,
        f"folder:{one}",
        None,
        str(one),
        r": only one class \(a\); a classifier needs two or more class sub-folders",
    )
    half = tmp_path / "half"  # train/ alone was read as one class named "train"
    _write_images(half / "train")
    _expect_data_error(capsys, tmp_path, f"folder:{half}", None, str(half), "has train/ but no test/ or val/ beside it")
    split = tmp_path / "split"
    for part in ("train", "test"):
        _write_images(split / part)
        shutil.rmtree(split / part / "b")
    _expect_data_error(capsys, tmp_path, f"folder:{split}", None, str(split / "train"), r"only one class \(a\)")


def test_folder_decompression_bomb(tmp_path, capsys, monkeypatch):
    _write_images(tmp_path / "f")
    bomb = tmp_path / "f" / "a" / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this: 256 pixels is a "bomb"
    _expect_data_error(
        capsys,
        tmp_path,
        f"folder:{tmp_path / 'f'}",
        None,
        str(bomb),
        r"too large to decode safely \(Image size \(256 pixels\) .*; downscale it",
    )


def test_folder_size_too_large_for_memory(tmp_path, capsys):
    _write_images(
        tmp_path / "f"
    )  # 4 training images at 10^8 x 10^8: 36 PiB, more than any address space: fails at once
    _expect_data_error(
        capsys,
        tmp_path,
        f"folder:{tmp_path / 'f'}?size=100000000",
        None,
        "4 images at 100000000x100000000x1",
        r"more than can be allocated; choose a smaller size with folder:PATH\?size=N",
    )


def test_folder_option_that_does_not_exist_is_named(tmp_path, capsys):
    # it was "PATH?holdout=0.2&sed=1: no such directory": an unknown key made the whole query part of the path
    _write_images(tmp_path / "f")
    name = f"folder:{tmp_path / 'f'}?holdout=0.2&sed=1"
    assert main(["data", "info", name]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"unknown folder option(s) sed in {name}; the options are size, channels, holdout, seed" in err
    )
    long = f"folder:{tmp_path / ('x' * 300)}"  # a name too long for the file system: a traceback from pathlib
    for name in (long, f"{long}?sed=1"):
        assert main(["data", "info", name]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "File name too long; give the image folder's path" in err
    for options, says in [
        ("size=abc", "folder options size=abc are not all numbers; e.g. size=32"),  # it showed a dict
        ("size=0", "image size (folder option size) must be positive, not 0"),
    ]:  # it said image_size
        assert main(["data", "info", f"folder:{tmp_path / 'f'}?{options}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    (tmp_path / "f?x=1").mkdir()  # a directory whose name has a "?" is still that directory
    _write_images(tmp_path / "f?x=1")
    assert main(["data", "info", f"folder:{tmp_path / 'f?x=1'}"]) == 0


# ------------------------------------------------------------------------------------------ fuzzing

# max_examples and randomness come from the profile (tests/conftest.py: fixed examples; `make fuzz`: new ones)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_only_data_errors(data: bytes, ndim=None) -> None:
    try:
        arr = parse_idx(data, "fuzz", ndim=ndim)
    except DataError as err:
        assert str(err).startswith("fuzz: ") and "\n" not in str(err)
        return
    assert arr.dtype == np.uint8 and (ndim is None or arr.ndim == ndim)


def test_idx_header_with_a_zero_dim_and_huge_others_is_a_data_error() -> None:
    # found by the fuzz test below: 0 x 5 x 5 x 134217728 x 2751463424 holds 0 bytes, and numpy refuses the shape
    data = bytes([0, 0, 8, 5]) + b"".join(struct.pack(">I", d) for d in (0, 5, 5, 0x08000000, 0xA4000000))
    with pytest.raises(DataError, match=r"^x: header 0x5x5x134217728x2751463424 is not an array shape numpy can hold$"):
        parse_idx(data, "x")


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([None, 1, 3]))
def test_fuzz_idx_random_bytes(data, ndim):
    _parse_only_data_errors(data, ndim)
    _parse_only_data_errors(gzip.compress(data, mtime=0), ndim)


@FUZZ
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.sampled_from([0x08, 0x08, 0x09, 0x0D, 0x42]),
    st.integers(0, 5),
    st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), min_size=0, max_size=5),
    st.integers(-8, 8),
    st.booleans(),
    st.binary(max_size=8),
)
def test_fuzz_idx_near_valid_headers(z0, z1, type_code, nd, dims, delta, compress, tail):
    """Headers close to valid ones (zero bytes, type, dimension count, dims, payload +/- a few bytes)."""
    z0 = 0 if z0 < 200 else z0
    z1 = 0 if z1 < 200 else z1
    head = bytes([z0, z1, type_code, nd]) + b"".join(struct.pack(">I", d) for d in dims)
    count = 1
    for d in dims:
        count *= d
    payload = b"\x07" * max(0, min(count, 4096) + delta) + tail
    data = head + payload
    if compress:
        data = gzip.compress(data, mtime=0)
    _parse_only_data_errors(data, None)
    _parse_only_data_errors(data, nd if nd else None)


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(0, 10_000))
def test_fuzz_idx_file_reader_damaged_gzip(noise, where):
    """read_idx on a real file: a valid gzip'ed IDX file with bytes overwritten somewhere."""
    import tempfile
    from pathlib import Path

    good = bytearray(gz(idx_bytes(make_idx_arrays(n_train=3, n_test=1)[IMG])))
    at = where % len(good)
    good[at : at + len(noise)] = noise
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.gz"
        p.write_bytes(bytes(good))
        try:
            read_idx(p, ndim=3)
        except DataError as err:
            assert str(p) in str(err)
