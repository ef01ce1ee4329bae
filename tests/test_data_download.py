"""Downloads without the network: a local http.server and file:// mirrors; checksums; atomicity."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading

import pytest

from data_helpers import (  # noqa: F401  (fixtures)
    REAL_FASHION,
    isolated,
    make_cifar_files,
    no_system,
    snapshot,
    write_cifar_tar,
    write_idx_dataset,
)
from resnetlab.cli import main
from resnetlab.data import load_dataset, sources
from resnetlab.errors import DataError


@pytest.fixture
def mirror(no_system, monkeypatch):
    """A mirror directory holding a synthetic 'mnist' whose digests the registry is told."""
    d = no_system / "mirror"
    write_idx_dataset(d / "mnist", n_train=20, n_test=10)
    files = []
    for i, fs in enumerate(sources.DATASETS["mnist"].files):
        data = (d / "mnist" / fs.name).read_bytes()
        # half the files by sha256, half by md5 only (as MNIST's official digests are)
        if i == 1:  # md5 of the archive and sha256 of its decompressed content (as for Fashion-MNIST)
            content = hashlib.sha256(gzip.decompress(data)).hexdigest()
            files.append(sources.FileSpec(fs.name, md5=hashlib.md5(data).hexdigest(), content_sha256=content))
        elif i % 2:
            files.append(sources.FileSpec(fs.name, md5=hashlib.md5(data).hexdigest()))
        else:
            files.append(sources.FileSpec(fs.name, md5="0" * 32, sha256=hashlib.sha256(data).hexdigest()))
    monkeypatch.setitem(
        sources.DATASETS, "mnist", sources.DatasetSpec("mnist", "idx", tuple(files), sources.MNIST_CLASSES)
    )
    return d


@pytest.fixture
def server(mirror):
    handler = functools.partial(_QuietHandler, directory=str(mirror))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def test_download_over_http_verifies_and_loads(server, monkeypatch, no_system):
    monkeypatch.setitem(sources.MIRRORS, "mnist", ["http://127.0.0.1:9/dead/", f"{server}/mnist/"])  # first one fails
    train, test = load_dataset("mnist", quiet=True)
    assert (len(train), len(test)) == (20, 10)
    cache = no_system / "xdg-cache" / "resnetlab" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(fs.name for fs in sources.DATASETS["mnist"].files)
    # found in the cache from now on, without the network
    monkeypatch.setitem(sources.MIRRORS, "mnist", [])
    assert len(load_dataset("mnist", download=False)[0]) == 20


def test_download_is_atomic_temp_file_in_same_dir(mirror, monkeypatch, no_system):
    monkeypatch.setitem(sources.MIRRORS, "mnist", [(mirror / "mnist").as_uri() + "/"])
    renames, fsyncs = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(sources.os, "replace", lambda a, b: (renames.append((str(a), str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(sources.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    load_dataset("mnist", quiet=True)
    assert len(renames) == 4 and len(fsyncs) >= 4
    for tmp, final in renames:
        assert os.path.dirname(tmp) == os.path.dirname(final)
        assert os.path.basename(tmp).startswith("." + os.path.basename(final)) and tmp.endswith(".part")


def test_checksum_mismatch_leaves_nothing(server, monkeypatch, no_system, mirror):
    (mirror / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b tampered")
    monkeypatch.setitem(sources.MIRRORS, "mnist", [f"{server}/mnist/"])
    cache_root = no_system / "xdg-cache"
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz failed: .*checksum mismatch: sha256"):
        load_dataset("mnist", quiet=True)
    leftovers = sorted(p.name for p in (cache_root / "resnetlab" / "mnist").iterdir())
    assert not [n for n in leftovers if n.endswith(".part") or n == "t10k-images-idx3-ubyte.gz"]
    assert leftovers == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # verified, kept


def test_mismatch_of_first_file_creates_no_directories(mirror, monkeypatch, no_system):
    (mirror / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"wrong")
    monkeypatch.setitem(sources.MIRRORS, "mnist", [(mirror / "mnist").as_uri()])
    before = snapshot(no_system)
    assert main(["data", "fetch", "mnist", "--quiet"]) == 2
    assert snapshot(no_system) == before and not (no_system / "xdg-cache").exists()


def test_content_digest_mismatch_fails_download(mirror, monkeypatch, no_system):
    fs = sources.DATASETS["mnist"].files[1]
    wrong = sources.FileSpec(fs.name, md5=fs.md5, content_sha256="0" * 64)
    files = (sources.DATASETS["mnist"].files[0], wrong, *sources.DATASETS["mnist"].files[2:])
    monkeypatch.setitem(sources.DATASETS, "mnist", sources.DatasetSpec("mnist", "idx", files, sources.MNIST_CLASSES))
    monkeypatch.setitem(sources.MIRRORS, "mnist", [(mirror / "mnist").as_uri()])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz failed: .*content sha256"):
        load_dataset("mnist", quiet=True)
    assert sorted(p.name for p in (no_system / "xdg-cache" / "resnetlab" / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz"
    ]


def test_real_fashion_files_do_not_pass_as_official_download(no_system, monkeypatch):
    """Debian's recompressed .gz files differ from the official ones: a download of them must fail."""
    monkeypatch.setitem(sources.MIRRORS, "fashion-mnist", [REAL_FASHION.as_uri() + "/"])
    with pytest.raises(DataError, match="checksum mismatch: md5"):
        load_dataset("fashion-mnist", quiet=True)
    assert not (no_system / "xdg-cache").exists()


def test_resnetlab_mirror_env_and_cli_fetch(mirror, monkeypatch, no_system, capsys):
    monkeypatch.setenv("RESNETLAB_MIRROR", mirror.as_uri())  # $RESNETLAB_MIRROR/<name>/<file>
    assert main(["data", "fetch", "mnist"]) == 0
    assert "fetched into" in capsys.readouterr().out
    assert main(["data", "verify", "mnist", "--quiet"]) == 0
    assert main(["data", "fetch", "mnist"]) == 0
    assert "already present" in capsys.readouterr().out


def test_cifar_archive_download(no_system, monkeypatch):
    files, _, _ = make_cifar_files()
    archive = write_cifar_tar(no_system / "mirror" / "cifar-10-binary.tar.gz", files)
    fs = sources.FileSpec("cifar-10-binary.tar.gz", md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(
        sources.DATASETS, "cifar10", sources.DatasetSpec("cifar10", "cifar", (fs,), sources.CIFAR10_CLASSES)
    )
    monkeypatch.setitem(sources.MIRRORS, "cifar10", [(no_system / "mirror").as_uri()])
    train, test = load_dataset("cifar10", quiet=True)
    assert (len(train), len(test)) == (30, 6)


def test_offline_message_names_every_place_and_both_fixes(no_system, monkeypatch):
    monkeypatch.setenv("RESNETLAB_DATA", str(no_system / "envdata"))
    monkeypatch.setitem(sources.MIRRORS, "fashion-mnist", ["http://127.0.0.1:9/"])  # nothing listens there
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", root=no_system / "given", quiet=True)
    msg = str(info.value)
    assert "\n" not in msg
    cache = no_system / "xdg-cache" / "resnetlab"
    for place in (
        no_system / "given" / "fashion-mnist",
        no_system / "given",
        no_system / "envdata" / "fashion-mnist",
        no_system / "envdata",
        cache / "fashion-mnist",
        cache,
        no_system / "no-system" / "fashion-mnist",
    ):
        assert f"{place} [" in msg, place
    assert "resnetlab data fetch fashion-mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "127.0.0.1:9" in msg


def test_download_false_message(no_system):
    with pytest.raises(DataError, match=r"not found; looked in: .*downloading is off.*resnetlab data fetch mnist"):
        load_dataset("mnist", download=False)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", download=False)
    assert "apt-get" not in str(info.value)  # no system package for MNIST
