#!/usr/bin/env bash
# Fill bench/gpu/carry/ (git-ignored) with what the H200 machine lacks, once, here (with network):
#   wheels/        for its python3.12: pydantic's stack (deploykit's core dependency) and onnxconverter-common
#                  (the fp16 ONNX cast of recipe gpu-fp16); torch, triton, timm, onnx, onnxruntime, numpy, pillow,
#                  typer, rich, pyyaml, scikit-learn (+scipy), matplotlib are already there. About 2.8 MiB.
#   fashion-mnist/ the test split (t10k-*, 4.3 MiB: accuracy and the parity checks) and the first 1,000 training
#                  images (the loader reads a train split; the gpu recipes calibrate nothing on it). About 4.7 MiB.
# Then give the device tool carry=["bench/gpu/carry"] (docs/gpu.md). Versions are this venv's.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=bench/gpu/carry
PY="${PY:-.venv/bin/python}"
SRC="${DEPLOYKIT_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
"$PY" -m pip download --quiet --python-version 3.12 --implementation cp --only-binary=:all: --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$CARRY/wheels" \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 onnxconverter-common==1.16.0
cp "$SRC/t10k-images-idx3-ubyte.gz" "$SRC/t10k-labels-idx1-ubyte.gz" "$CARRY/fashion-mnist/"
"$PY" - "$SRC" "$CARRY/fashion-mnist" 1000 <<'PYEOF'
import gzip, sys
from pathlib import Path

src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for name, item in (("train-images-idx3-ubyte.gz", 28 * 28), ("train-labels-idx1-ubyte.gz", 1)):
    raw = gzip.open(src / name).read()
    ndim = raw[3]
    head = bytearray(raw[:4 + 4 * ndim])
    head[4:8] = n.to_bytes(4, "big")  # the item count: the first n items follow
    with gzip.open(dst / name, "wb") as f:
        f.write(bytes(head) + raw[4 + 4 * ndim: 4 + 4 * ndim + n * item])
PYEOF
du -sh "$CARRY"/* "$CARRY"
