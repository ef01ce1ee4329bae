"""Where datasets live: the built-in registry, the lookup order, checksums and downloads.

Lookup order for a built-in dataset NAME (first complete copy wins):

1. the ``root`` argument (``--root`` / ``--data-root``),
2. ``$RESNETLAB_DATA``,
3. the user cache, ``$XDG_CACHE_HOME/resnetlab`` (default ``~/.cache/resnetlab``),
4. system copies: ``/usr/share/datasets/fashion-mnist`` from the Debian/Ubuntu package
   ``dataset-fashion-mnist`` (and ``/usr/share/datasets/mnist`` should one exist).

In each of the first three places both ``<place>/<NAME>/`` and the flat ``<place>/`` are tried,
in that order. A flat directory is taken to hold whichever dataset was asked for (MNIST and
Fashion-MNIST use the same file names): keep both in sub-folders; ``resnetlab data verify``
tells them apart by checksum. Otherwise, when downloading is allowed, the files are fetched
from the official mirrors (``MIRRORS``, or ``$RESNETLAB_MIRROR/<NAME>/<file>`` when that is set)
into ``<cache>/<NAME>/``: each to a temporary file in the same directory, fsync'ed, checked
against the digests below, then renamed into place, so a failed or corrupt download leaves
nothing behind.

Checksums. ``md5``/``sha256`` are digests of the official download (the ``.gz``/``.tar.gz``);
``content_sha256`` is the digest of the decompressed IDX file, independent of how it was
compressed. A download must match ``sha256`` when it is known, else ``md5``, and also
``content_sha256`` when that is known.

* Fashion-MNIST: the MD5s are the ones zalandoresearch publishes. The SHA-256 of the official
  ``.gz`` files could not be computed here: Debian's copies in /usr/share/datasets are *not*
  byte-identical to them (their gzip headers were normalised, which drops the stored file name:
  each is exactly len(name)+1 bytes shorter and has other MD5s). The deflate payload is the
  same, so ``content_sha256`` was computed from Debian's files after decompression; a copy
  verifies if either its archive MD5 or its decompressed SHA-256 matches.
* MNIST and CIFAR-10: only the official MD5s are known (SHA-256 could not be computed offline),
  so the MD5 is verified, as torchvision does. Extracted CIFAR-10 batches have no published
  digest and are reported as unverified (their structure is still checked when loaded).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from resnetlab.errors import DataError, UsageError
from resnetlab.fileio import fsync_dir

FASHION_CLASSES = (
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
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = ("test_batch.bin",)


@dataclass(frozen=True)
class FileSpec:
    """One downloadable file and what is known about it."""

    name: str  # file name on the mirror and in the cache
    md5: str | None = None  # of the official file
    sha256: str | None = None  # of the official file
    content_sha256: str | None = None  # of the decompressed content (IDX files only)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "idx" or "cifar"
    files: tuple[FileSpec, ...]
    classes: tuple[str, ...]
    apt_package: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "idx",
        (
            FileSpec(
                "train-images-idx3-ubyte.gz",
                md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            FileSpec(
                "train-labels-idx1-ubyte.gz",
                md5="25c81989df183df01b3e8a0aad5dffbe",
                content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            FileSpec(
                "t10k-images-idx3-ubyte.gz",
                md5="bef4ecab320f06d8554ea6380940ec79",
                content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            FileSpec(
                "t10k-labels-idx1-ubyte.gz",
                md5="bb300cfdad3c16e7a12a480ee83fd310",
                content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        FASHION_CLASSES,
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        "mnist",
        "idx",
        (
            FileSpec("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            FileSpec("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432"),
            FileSpec("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3"),
            FileSpec("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        MNIST_CLASSES,
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "cifar",
        (FileSpec(CIFAR_ARCHIVE, md5="c32a1d4ab5d03f1284b67883e8d87530"),),
        CIFAR10_CLASSES,
    ),
}
BUILTIN = tuple(DATASETS)
DEFAULT_DATASET = "fashion-mnist"

# Base URLs, tried in order. Tests (and air-gapped sites) replace these, or set $RESNETLAB_MIRROR.
MIRRORS: dict[str, list[str]] = {
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
# Dataset-specific system directories (searched after the cache, flat layout).
SYSTEM_DIRS: dict[str, list[str]] = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "cifar10": [],
}
DOWNLOAD_TIMEOUT_S = 60.0


def spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(BUILTIN)
        raise UsageError(f"unknown dataset {name!r}: use one of {known} or folder:PATH") from None


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/resnetlab``, else ``~/.cache/resnetlab``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "resnetlab"


@dataclass
class Place:
    """One directory searched for a dataset and what was found there."""

    label: str  # why we looked: "--root", "$RESNETLAB_DATA", "cache", "system"
    path: Path
    note: str = ""  # "", "no such directory", "incomplete: missing ...", ...


@dataclass
class Location:
    """A complete copy of a built-in dataset."""

    name: str
    directory: Path
    label: str
    files: dict[str, Path] = field(default_factory=dict)  # logical name -> path
    form: str = ""  # idx: "gz"/"raw"/"mixed"; cifar: "archive"/"folder"

    def describe(self) -> str:
        return f"{self.directory} ({self.label})"


def search_dirs(name: str, root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The directories searched for built-in dataset ``name``, in order."""
    out: list[tuple[str, Path]] = []
    bases: list[tuple[str, Path]] = []
    if root is not None and str(root) != "":
        bases.append(("--root", Path(root).expanduser()))
    env = os.environ.get("RESNETLAB_DATA", "")
    if env:
        bases.append(("$RESNETLAB_DATA", Path(env).expanduser()))
    bases.append(("cache", cache_dir()))
    for label, base in bases:
        out.append((label, base / name))
        out.append((label, base))
    for d in SYSTEM_DIRS.get(name, []):
        out.append(("system", Path(d)))
    return out


def locate(name: str, root: str | os.PathLike | None = None) -> tuple[Location | None, list[Place]]:
    """Find the first complete copy of built-in dataset ``name``; also return every place looked at."""
    ds = spec(name)
    places: list[Place] = []
    for label, d in search_dirs(name, root):
        place = Place(label, d)
        places.append(place)
        if not d.is_dir():
            place.note = "no such directory" if not d.exists() else "not a directory"
            continue
        found, note = (_probe_idx if ds.kind == "idx" else _probe_cifar)(d)
        if found is not None:
            form, files = found
            # a root the user named but that failed would otherwise pass unnoticed (a typo, a damaged copy)
            for given in dict.fromkeys(
                p.label for p in places if p.label in ("--root", "$RESNETLAB_DATA") and p.label != label
            ):
                base = next(
                    p.path for p in reversed(places) if p.label == given
                )  # the base itself, searched after base/NAME
                # "--root" is the label of a root given as an argument: `data --root`, or --data-root of train and eval
                what = f"the data root {base}" if given == "--root" else f"RESNETLAB_DATA={base}"
                warnings.warn(
                    f"{what} holds no usable {name} (see `resnetlab data info {name} --root {base}`); "
                    f"using {d} ({label}). Fix or drop it",
                    stacklevel=2,
                )
            return Location(name, d, label, files, form), places
        place.note = note
    return None, places


def _probe_idx(d: Path) -> tuple[tuple[str, dict[str, Path]] | None, str]:
    files: dict[str, Path] = {}
    missing = []
    for stem in IDX_FILES:
        gz, raw = d / f"{stem}.gz", d / stem
        if gz.is_file():
            files[stem] = gz
        elif raw.is_file():
            files[stem] = raw
        else:
            missing.append(f"{stem}[.gz]")
    if not files:
        return None, "no dataset files"
    if missing:
        return None, "incomplete: missing " + ", ".join(missing)
    kinds = {p.suffix == ".gz" for p in files.values()}
    return ("gz" if kinds == {True} else "raw" if kinds == {False} else "mixed", files), ""


def _probe_cifar(d: Path) -> tuple[tuple[str, dict[str, Path]] | None, str]:
    archive = d / CIFAR_ARCHIVE
    if archive.is_file():
        return ("archive", {CIFAR_ARCHIVE: archive}), ""
    notes = []
    for folder in (d / CIFAR_FOLDER, d):
        names = CIFAR_TRAIN + CIFAR_TEST
        present = {n: folder / n for n in names if (folder / n).is_file()}
        if len(present) == len(names):
            meta = folder / "batches.meta.txt"
            if meta.is_file():
                present["batches.meta.txt"] = meta
            return ("folder", present), ""
        if present:
            notes.append(f"incomplete {folder}: missing " + ", ".join(n for n in names if n not in present))
    return None, "; ".join(notes) or "no dataset files"


def not_found_message(name: str, places: list[Place], reason: str) -> str:
    """The one-line error for a dataset found nowhere: every place, the reason, both fixes."""
    looked = "; ".join(f"{p.path} [{p.label}{': ' + p.note if p.note else ''}]" for p in places)
    fixes = f"run `resnetlab data fetch {name}` while online"
    ds = DATASETS.get(name)
    if ds is not None and ds.apt_package:
        fixes += f", or install the system copy with `sudo apt-get install {ds.apt_package}`"
    return f"dataset {name!r} not found; looked in: {looked}; {reason}; to fix: {fixes}"


# --------------------------------------------------------------------------------------- digests


@dataclass
class FileCheck:
    path: Path
    status: str  # "ok", "mismatch" or "unverified"
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "mismatch"


def file_digests(path: Path, algorithms: tuple[str, ...] = ("md5", "sha256")) -> dict[str, str]:
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def content_sha256(path: Path) -> str:
    """SHA-256 of the file's content after gzip decompression (of the file itself if raw)."""
    h = hashlib.sha256()
    with open(path, "rb") as raw:
        is_gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gz else raw
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, fs: FileSpec | None) -> FileCheck:
    """Compare ``path`` with what is known of the official file ``fs``.

    The official digest (sha256 when known, else md5) decides for the downloaded form; a
    recompressed or decompressed copy of an IDX file verifies by ``content_sha256``.
    """
    if fs is None:
        return FileCheck(path, "unverified", "no published digest")
    try:
        if path.stat().st_size == 0:
            return FileCheck(path, "mismatch", "empty file")
        archive_known = fs.sha256 or fs.md5
        if archive_known and path.name == fs.name:
            got = file_digests(path)
            algo = "sha256" if fs.sha256 else "md5"
            if got[algo] == archive_known:
                return FileCheck(path, "ok", f"{algo} {archive_known} matches the official file")
            if not fs.content_sha256:
                return FileCheck(path, "mismatch", f"{algo} is {got[algo]}, expected {archive_known}")
        if fs.content_sha256:
            try:
                got_c = content_sha256(path)
            except (OSError, EOFError, zlib.error) as err:
                return FileCheck(path, "mismatch", f"cannot decompress: {err}")
            if got_c == fs.content_sha256:
                how = "decompressed content" if path.suffix == ".gz" else "content"
                return FileCheck(path, "ok", f"sha256 of the {how} {fs.content_sha256} matches")
            return FileCheck(path, "mismatch", f"content sha256 is {got_c}, expected {fs.content_sha256}")
        return FileCheck(path, "unverified", "no published digest for this form of the file")
    except OSError as err:
        return FileCheck(path, "mismatch", f"cannot read: {err.strerror or err}")


def check_location(loc: Location) -> list[FileCheck]:
    ds = spec(loc.name)
    by_name = {fs.name: fs for fs in ds.files}
    checks = []
    for logical, path in loc.files.items():
        if logical == "batches.meta.txt":
            continue
        fs = by_name.get(logical) or by_name.get(f"{logical}.gz")
        if ds.kind == "cifar" and loc.form == "folder":
            fs = None
        checks.append(check_file(path, fs))
    return checks


# -------------------------------------------------------------------------------------- download


def mirror_urls(name: str, filename: str) -> list[str]:
    override = os.environ.get("RESNETLAB_MIRROR", "")
    if override:
        return [f"{override.rstrip('/')}/{name}/{filename}"]
    return [base if base.endswith(filename) else base.rstrip("/") + "/" + filename for base in MIRRORS.get(name, [])]


def fetch(name: str, *, quiet: bool = False) -> Location:
    """Download every file of built-in dataset ``name`` that the cache lacks or has corrupt."""
    ds = spec(name)
    dest = cache_dir() / name
    for fs in ds.files:
        target = dest / fs.name
        if target.is_file() and check_file(target, fs).status == "ok":
            continue
        download_file(mirror_urls(name, fs.name), target, fs, quiet=quiet)
    loc, _ = locate_in(name, dest, "cache")
    if loc is None:  # pragma: no cover - the files were just verified
        raise DataError(f"{dest}: downloaded files are incomplete")
    return loc


def locate_in(name: str, d: Path, label: str) -> tuple[Location | None, str]:
    ds = spec(name)
    found, note = (_probe_idx if ds.kind == "idx" else _probe_cifar)(d)
    if found is None:
        return None, note
    return Location(name, d, label, found[1], found[0]), ""


def download_file(urls: list[str], target: Path, fs: FileSpec, *, quiet: bool = False) -> Path:
    """Fetch ``fs`` from the first of ``urls`` that serves a verified copy; atomically to ``target``.

    Each try writes ``.<name>.*.part`` in ``target``'s directory, fsyncs it, checks it, and
    renames it over ``target``; any failure removes the partial file (and a directory we created
    that stayed empty). Raises one :class:`DataError` listing every URL's failure.
    """
    if not urls:
        raise DataError(f"{target.name}: no download URL configured")
    directory = target.parent
    created = []  # directories this call creates, deepest first, removed again on failure
    d = directory
    while not d.exists() and d != d.parent:
        created.append(d)
        d = d.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{directory}: cannot create the download directory ({err.strerror or err})") from None
    failures = []
    try:
        for url in urls:
            try:
                _download_one(url, target, fs, quiet=quiet)
                return target
            except _Failure as err:
                failures.append(f"{url}: {err}")
    finally:
        if not target.exists():
            for d in created:
                _remove_empty(d)
    raise DataError(f"download of {target.name} failed: " + "; ".join(failures))


class _Failure(Exception):
    pass


def _download_one(url: str, target: Path, fs: FileSpec, *, quiet: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        md5, sha = hashlib.md5(), hashlib.sha256()
        received = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "resnetlab"})
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp, os.fdopen(fd, "wb") as out:
                fd = -1
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with _progress(total, target.name, quiet) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        md5.update(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as err:
            raise _Failure(f"HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise _Failure(f"cannot connect ({err.reason})") from None
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise _Failure(f"{type(err).__name__}: {err}") from None
        if total is not None and received != total:
            raise _Failure(f"truncated download: {received} of {total} bytes")
        if received == 0:
            raise _Failure("empty download")
        if fs.sha256:
            if sha.hexdigest() != fs.sha256:
                raise _Failure(f"checksum mismatch: sha256 {sha.hexdigest()}, expected {fs.sha256}")
        elif fs.md5:
            if md5.hexdigest() != fs.md5:
                raise _Failure(f"checksum mismatch: md5 {md5.hexdigest()}, expected {fs.md5}")
        if fs.content_sha256:  # also the SHA-256 of the decompressed content, where known
            try:
                got = content_sha256(tmp)
            except (OSError, EOFError, zlib.error) as err:
                raise _Failure(f"corrupt gzip data ({err})") from None
            if got != fs.content_sha256:
                raise _Failure(f"checksum mismatch: content sha256 {got}, expected {fs.content_sha256}")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


class _NullBar:
    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        pass


def _progress(total: int | None, desc: str, quiet: bool):
    if quiet:
        return _NullBar()
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing when stderr is a file or pipe
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
