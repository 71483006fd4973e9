#!/usr/bin/env bash
# One GPU run of the torch-cuda runtime (bench/gpu/h200.py), from a checkout, with nothing from the network:
#   1. records the machine (nvidia-smi, python, torch, CUDA) in $OUT/environment.txt;
#   2. installs the carried wheels (bench/gpu/carry/wheels, made by bench/gpu/prepare_carry.sh) into a temp dir
#      with pip --no-index (or by unpacking them when pip is missing) and puts it and the checkout on PYTHONPATH;
#   3. uses the carried Fashion-MNIST (bench/gpu/carry/fashion-mnist) when the Debian package is not installed;
#   4. runs h200.py under a hard limit of 460 s (its own budget is 420 s, section by section; results are
#      written after every section), so the whole script stays under 8 minutes.
# Output in $OUT: h200.json, h200.md, r50_throughput.png, <model>/bench.{json,md} + pareto_bs*.png, h200.log.
#
# Usage, in the repository root of the GPU machine:
#   OUT=/some/dir bash bench/gpu/h200.sh [h200.py options, e.g. --sections r50 --budget-s 200]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to the output folder}"
CARRY=bench/gpu/carry
PY="${PYTHON:-python3.12}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
SITE="$(mktemp -d)/site"
mkdir -p "$OUT" "$SITE"

{
  echo "# bench/gpu/h200.sh at $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA',
torch.version.cuda, '| cuda available', torch.cuda.is_available())" 2>&1
} | tee "$OUT/environment.txt"

if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$CARRY"/wheels/*.whl 2>&1 | tail -3 \
    || true
  if ! PYTHONPATH="$SITE" "$PY" -c "import pydantic" >/dev/null 2>&1; then  # no pip: a wheel is a zip archive
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
      "$SITE" "$CARRY"/wheels/*.whl
  fi
else
  echo "no carried wheels in $CARRY/wheels (bench/gpu/prepare_carry.sh makes them)" | tee -a "$OUT/environment.txt"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -d "$CARRY/fashion-mnist" ]; then
  export DEPLOYKIT_FASHION_MNIST_DIR="$PWD/$CARRY/fashion-mnist"
fi
"$PY" -c "import pydantic, onnxconverter_common, deploykit; print('imports ok: pydantic', pydantic.VERSION,
'| deploykit', deploykit.__version__)" 2>&1 | tee -a "$OUT/environment.txt"
echo "Fashion-MNIST: ${DEPLOYKIT_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" | tee -a "$OUT/environment.txt"

timeout -k 10 --signal=INT 460 "$PY" bench/gpu/h200.py --out "$OUT" "$@" 2>&1 | tee "$OUT/h200.log"
rc=${PIPESTATUS[0]}
echo "h200.py exit code $rc (124: the 460 s limit stopped it; the sections written before are in h200.json)" \
  | tee -a "$OUT/h200.log"
exit "$rc"
