#!/usr/bin/env bash
# Sets up keras_cdl on a fresh machine: a virtual environment in .venv with the
# package and its test extras, and Fashion-MNIST from Debian if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install --quiet -e ".[test]"
DATA=/usr/share/datasets/fashion-mnist
KERAS_CACHE="${KERAS_HOME:-$HOME/.keras}/datasets/fashion-mnist"
if [ ! -f "$DATA/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$KERAS_CACHE/t10k-labels-idx1-ubyte.gz" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q dataset-fashion-mnist
fi
