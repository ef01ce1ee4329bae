#!/usr/bin/env bash
# Makes sure Fashion-MNIST is on this machine, offline-first:
# an existing copy (any place resnetlab looks), else Debian's dataset-fashion-mnist where apt works,
# else a checksummed download from the official mirrors into ~/.cache/resnetlab.
set -euo pipefail
PY=${1:-.venv/bin/python}
if "$PY" -m resnetlab data verify fashion-mnist --quiet 2>/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Fashion-MNIST from the Debian package dataset-fashion-mnist"
  if ! apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "apt-get could not install dataset-fashion-mnist; downloading instead"
  fi
fi
"$PY" -m resnetlab data fetch fashion-mnist
