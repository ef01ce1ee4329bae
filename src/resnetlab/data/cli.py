"""``resnetlab data info|fetch|verify [NAME] [--root R] [--quiet]``.

* ``info``: where each dataset was found (or "not found" and every place looked at), its
  train/test sizes, image shape and per-class counts. Without NAME: every built-in dataset (a
  missing one is reported, not an error); with NAME, a missing dataset is an error (exit 2).
* ``fetch``: make sure a verified copy exists, downloading into the user cache when needed.
  Without NAME: every built-in dataset.
* ``verify``: the checksum result of each file (exit 2 on a mismatch or, with NAME, when the
  dataset is missing). Without NAME: every built-in dataset that is present. Files without a
  published digest are reported as unverified and their structure is checked by loading them.

``--quiet`` prints nothing on success; errors are one line on stderr (exit 2) as always.
"""

from __future__ import annotations

import argparse
import sys

from resnetlab.data import sources
from resnetlab.data.datasets import Split, load_dataset, load_location
from resnetlab.errors import DataError, UsageError


def run_data(args: argparse.Namespace) -> int:
    action = args.action
    name = args.name
    root = getattr(args, "root", None)
    quiet = bool(getattr(args, "quiet", False))
    out = _Printer(quiet)
    if name is not None and not name.startswith("folder:"):
        sources.spec(name)  # unknown names are a UsageError before anything else
    names = [name] if name is not None else list(sources.BUILTIN)
    if action == "info":
        for n in names:
            _info(n, root, out, explicit=name is not None)
        return 0
    if action == "verify":
        failures = []
        for n in names:
            failures += _verify(n, root, out, explicit=name is not None)
        if failures:
            raise DataError(
                failures[0]
                if len(failures) == 1
                else f"{len(failures)} files failed verification: " + "; ".join(failures)
            )
        return 0
    if action == "fetch":
        for n in names:
            _fetch(n, root, out)
        return 0
    raise UsageError(f"unknown data action {action!r}")  # argparse's choices make this unreachable


class _Printer:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, line: str = "") -> None:
        if not self.quiet:
            print(line, flush=True)


def _describe_split(train: Split, test: Split, out: _Printer) -> None:
    c, h, w = train.image_shape
    out(f"  train {len(train)}, test {len(test)}, image {c}x{h}x{w} (uint8), {len(train.classes)} classes")
    tr, te = train.class_counts(), test.class_counts()
    width = max(len(c) for c in train.classes)
    out(f"  {'class':<{width}}  {'train':>7}  {'test':>6}")
    for cls, a, b in zip(train.classes, tr, te):
        out(f"  {cls:<{width}}  {a:>7}  {b:>6}")


def _places_lines(places: list[sources.Place], out: _Printer) -> None:
    out("  looked in:")
    for p in places:
        out(f"    {p.path} [{p.label}{': ' + p.note if p.note else ''}]")


def _info(name: str, root, out: _Printer, *, explicit: bool) -> None:
    if name.startswith("folder:"):
        train, test = load_dataset(name)
        out(f"{name}: image folder")
        _describe_split(train, test, out)
        return
    loc, places = sources.locate(name, root)
    if loc is None:
        if explicit:
            raise DataError(sources.not_found_message(name, places, "it has not been downloaded"))
        out(f"{name}: not found")
        _places_lines(places, out)
        return
    out(f"{name}: found in {loc.describe()}, {loc.form} files")
    train, test = load_location(loc)
    _describe_split(train, test, out)


def _verify(name: str, root, out: _Printer, *, explicit: bool) -> list[str]:
    if name.startswith("folder:"):
        train, test = load_dataset(name)
        out(f"{name}: no checksums for image folders; all {len(train) + len(test)} images read")
        return []
    loc, places = sources.locate(name, root)
    if loc is None:
        if explicit:
            raise DataError(sources.not_found_message(name, places, "nothing to verify"))
        out(f"{name}: not found")
        _places_lines(places, out)
        return []
    out(f"{name}: {loc.describe()}")
    checks = sources.check_location(loc)
    failures = []
    for c in checks:
        out(f"  {c.path.name}: {c.status} ({c.detail})")
        if c.status == "mismatch":
            failures.append(f"{c.path}: checksum mismatch ({c.detail})")
    if not failures and any(c.status == "unverified" for c in checks):
        train, test = load_location(loc)  # no digest: at least check the structure
        out(f"  structure ok: train {len(train)}, test {len(test)}, image {'x'.join(map(str, train.image_shape))}")
    return failures


def _fetch(name: str, root, out: _Printer) -> None:
    if name.startswith("folder:"):
        raise UsageError("folder datasets are not downloadable; fetch takes fashion-mnist, mnist or cifar10")
    loc, places = sources.locate(name, root)
    if loc is not None:
        checks = sources.check_location(loc)
        if all(c.ok for c in checks):
            out(f"{name}: already present in {loc.describe()}")
            return
        bad = next(c for c in checks if not c.ok)
        print(
            f"resnetlab: warning: {bad.path} fails verification ({bad.detail}); "
            "downloading a fresh copy into the cache",
            file=sys.stderr,
        )
    try:
        new = sources.fetch(name, quiet=out.quiet)
    except DataError as err:
        ds = sources.spec(name)
        hint = f"; or install the system copy with `sudo apt-get install {ds.apt_package}`" if ds.apt_package else ""
        raise DataError(f"cannot fetch {name}: {err}{hint}") from None
    out(f"{name}: fetched into {new.directory}")
    first, _ = sources.locate(name, root)
    if first is not None and first.directory != new.directory:
        print(
            f"resnetlab: warning: {first.directory} comes first in the lookup order and will be used; remove it",
            file=sys.stderr,
        )
