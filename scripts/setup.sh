#!/usr/bin/env bash
# Set up everything deploykit needs on a fresh Debian x86-64 machine: Fashion-MNIST (apt) and a
# virtualenv pinned by constraints.txt. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

stamp="$VENV/.deploykit-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "is ignored" || true
# constraints.txt pins every package (torch 2.14.1 / torchvision 0.29.1 come from the local wheel
# folder pip is configured with here): the same versions on every machine, no surprise CUDA pulls.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[all,dev]" 2>&1 \
  | grep -v "is ignored" || true
"$VENV/bin/python" -c "import deploykit, torch, timm, onnxruntime, openvino, bentoml" \
  || { echo "setup: install failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, onnxruntime as o; print("torch", torch.__version__, "onnxruntime", o.__version__)'))"
