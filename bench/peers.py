"""deploykit INT8 side by side with the peers: same model, same data, same machine, one process, interleaved timing.

Contenders (all INT8 post-training quantization of the same float ONNX that deploykit exported):
  * deploykit INT8, ONNX Runtime QDQ (quantize_onnx stage: per-channel S8 weights, U8 activations)
  * deploykit INT8, OpenVINO IR (quantize_openvino stage: NNCF, preset 'performance'), when registered
  * onnxruntime.quantization.quantize_static with its default settings, run on ONNX Runtime
  * OpenVINO + NNCF PTQ: nncf.quantize(ov_model, dataset) with its defaults, run on OpenVINO (f32 hint)
  * nvidia-modelopt ONNX INT8 PTQ (modelopt.onnx.quantization.quantize, CPU calibration), run on ONNX Runtime
plus the FP32 ONNX on ONNX Runtime and OpenVINO as the reference.

Models: a checkpoint with labelled data (accuracy on the evaluation images), or timm ``resnet50`` at 224
with random weights (data-free: deploykit calibrates on inputs synthesized from BatchNorm statistics,
the peers on the same number of Gaussian inputs; quality = top-1 agreement and SQNR vs FP32 on held-out
Gaussian inputs, since random weights have no accuracy).

Usage:
    python bench/peers.py --model fmnist --checkpoint models/resnet10t_fmnist.pth --out bench/results/peers_fmnist
    python bench/peers.py --model resnet50 --out bench/results/peers_resnet50
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from deploykit import compress
from deploykit.artifact import FLOAT_MODEL, Artifact, write_json
from deploykit.backends import create_backend
from deploykit.benchmark import BenchVariant, benchmark_variants, eval_data, file_size_mb, write_bench
from deploykit.evaluate import fidelity
from deploykit.recipe import parse_recipe
from deploykit.stages import STAGES

INPUT = "input"


def deploykit_recipe(calibration_images: int, random_weights: bool) -> dict:
    # random weights: FP32-vs-INT8 top-1 agreement is meaningless (near-tied logits), so the stages'
    # agreement floors are off there; fidelity (SQNR) is reported for every contender instead
    floor = {"min_top1_agreement": 0.0} if random_weights else {}
    stages = ["fuse_bn", {"export_onnx": {"opset": 17}},
              {"quantize_onnx": {"method": "minmax", "per_channel": True, **floor}}]
    if "quantize_openvino" in STAGES:
        stages.append({"quantize_openvino": floor})
    return {"version": 1, "name": "peers-int8", "description": "bench/peers.py: deploykit's INT8 stages",
            "target": "cpu", "data": {"calibration_images": calibration_images, "synthetic_images": calibration_images,
                                      "synthetic_steps": 10, "check_images": 16},
            "stages": stages, "eval": {"enabled": False}}


def input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def ort_default(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """onnxruntime.quantization.quantize_static with every setting at its default."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = input_name(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    quantize_static(str(fp32), str(out), Reader())
    return out


def original_fp32_onnx(checkpoint, input_size, out: Path) -> Path:
    """The original model as deploykit's own FP32 export makes it (static pads, BatchNorm folded), not a plain
    torch.onnx.export with the dynamic 'same' padding of tf_ models: the fair (strongest) FP32 baseline."""
    from deploykit.checkpoint import load_checkpoint

    return fp32_onnx(load_checkpoint(checkpoint).model, input_size, out)


def fp32_onnx(model, input_size, out: Path) -> Path:
    """``model`` (changed in place) exported the way deploykit's chain does: static pads, BatchNorm folded."""
    from deploykit.stages.export_onnx import export_onnx
    from deploykit.stages.fuse_bn import fuse_conv_bn
    from deploykit.stages.static_pad import make_padding_static

    model.eval()
    make_padding_static(model, input_size)
    model, _ = fuse_conv_bn(model)
    return export_onnx(model.eval(), out, input_size)


def nncf_default(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """OpenVINO + NNCF PTQ with nncf.quantize defaults, saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                      subset_size=len(calib))
    ov.save_model(q, str(out))
    return out


def modelopt_int8(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """nvidia-modelopt ONNX INT8 PTQ, calibrated on the CPU execution provider."""
    from modelopt.onnx.quantization import quantize

    quantize(str(fp32), quantize_mode="int8", calibration_data={input_name(fp32): calib}, calibration_eps=["cpu"],
             high_precision_dtype="fp32", output_path=str(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("fmnist", "resnet50"), required=True)
    ap.add_argument("--checkpoint", default="models/resnet10t_fmnist.pth")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--calibration-images", type=int, default=None, help="default 256 (fmnist) / 32 (resnet50)")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/deploykit-peers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse models already built under --work")
    ap.add_argument("--plot-metric", choices=("p50", "cpu_p50"), default="cpu_p50",
                    help="x axis: wall p50 or CPU time per call (the stable one on a shared machine)")
    args = ap.parse_args()
    out = Path(args.out or f"bench/results/peers_{args.model}")
    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    notes = [f"threads={args.threads} for every runtime; up to {args.runs} interleaved rounds per batch size "
             f"(time-capped at {args.budget:.0f} s) on a shared machine: see load_average"]

    # 1. deploykit: the same stages as its int8-ptq recipe, minus the runtime selection (every variant is shown)
    if args.model == "resnet50":
        import timm
        import torch

        from deploykit.checkpoint import save_timm_checkpoint

        ckpt = work / "resnet50_random.pth"
        if not ckpt.exists():
            torch.manual_seed(0)
            m = timm.create_model("resnet50", pretrained=False)
            save_timm_checkpoint(ckpt, arch="resnet50", state_dict=m.state_dict(), args={"input_size": (3, 224, 224)})
        n_cal = args.calibration_images or 32
        data = None
    else:
        ckpt = Path(args.checkpoint)
        n_cal = args.calibration_images or 256
        data = args.data
    recipe = parse_recipe(deploykit_recipe(n_cal, random_weights=data is None), "bench/peers.py")
    t = time.perf_counter()
    timings = {}
    if not (args.reuse and (work / "deploykit" / "manifest.json").is_file()):
        compress(ckpt, recipe, out=work / "deploykit", overwrite=True, **({"data__name": data} if data else {}))
        timings["deploykit compress"] = round(time.perf_counter() - t, 1)
    art = Artifact.open(work / "deploykit")
    fp32 = art.path / FLOAT_MODEL
    pre = art.preprocessing

    # 2. the peers' calibration inputs: real training images (labelled case) or Gaussian noise (data-free)
    rng = np.random.default_rng(0)
    if data:
        from deploykit.data import resolve_data
        from deploykit.recipe import DataConfig

        splits = resolve_data(DataConfig(name=data, calibration_images=n_cal))
        calib = splits.calibration.load(pre, np.arange(len(splits.calibration)))
        notes.append(f"every quantizer calibrated on the same {n_cal} {data} training images")
    else:
        calib = rng.standard_normal((n_cal, *pre.input_size)).astype(np.float32)
        notes.append(f"data-free: deploykit calibrated on {n_cal} inputs synthesized from BatchNorm statistics "
                     f"(10 steps), the peers on {n_cal} N(0,1) inputs; random weights, so quality is fidelity to FP32")

    models: dict[str, tuple[str, Path, str]] = {}  # name -> (backend, path, precision)
    models["fp32 onnxruntime"] = ("onnxruntime", fp32, "fp32")
    models["fp32 openvino"] = ("openvino", fp32, "fp32")
    for f in sorted(art.path.iterdir()):
        if f.name == "model.int8.onnx" or (f.name == "model.onnx" and art.runtime.get("precision") == "int8"):
            models["deploykit int8 (onnxruntime QDQ)"] = ("onnxruntime", f, "int8")
        elif f.suffix == ".xml":
            models["deploykit int8 (openvino NNCF IR)"] = ("openvino", f, "int8")
    peers = {"onnxruntime quantize_static defaults": ("onnxruntime", ort_default, work / "ort_default.onnx"),
             "openvino+nncf defaults": ("openvino", nncf_default, work / "nncf_default.xml"),
             "modelopt onnx int8": ("onnxruntime", modelopt_int8, work / "modelopt_int8.onnx")}
    failed = []
    for name, (backend, fn, path) in peers.items():
        t = time.perf_counter()
        if args.reuse and path.is_file():
            models[name] = (backend, path, "int8")
            continue
        try:
            fn(fp32, path, calib)
            models[name] = (backend, path, "int8")
            timings[name] = round(time.perf_counter() - t, 1)
        except Exception as err:  # a peer that fails here is reported, with its error
            failed.append({"name": name, "reason": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})
            traceback.print_exc()

    # OpenVINO: precision int8/fp32 both set the f32 hint (its bf16 default was slower here); INT8 layers stay INT8
    variants = [BenchVariant(name, backend, precision,
                             (lambda b=backend, p=path, q=precision: create_backend(b, p, threads=args.threads, precision=q)),
                             path.name, file_size_mb(path)) for name, (backend, path, precision) in models.items()]
    eval_set = eval_data(art, data, args.eval_images)[0] if data else None
    result = benchmark_variants(variants, pre, eval_set, [int(b) for b in args.batch.split(",")], runs=args.runs,
                                warmup=3, budget_s=args.budget, skipped=failed)

    if not data:  # fidelity to FP32 on held-out Gaussian inputs (random weights: no accuracy to measure)
        held = np.random.default_rng(1).standard_normal((64, *pre.input_size)).astype(np.float32)
        ref = create_backend("onnxruntime", fp32, threads=args.threads).run(held)
        for row in result["variants"]:
            backend, path, _ = models[row["name"]]
            got = np.concatenate([create_backend(backend, path, threads=args.threads).run(held[i:i + 16])
                                  for i in range(0, 64, 16)])
            row["fidelity_vs_fp32"] = fidelity(ref, got)
    result["artifact"] = {"path": f"{args.model} ({ckpt.name})", "checkpoint": str(ckpt)}
    result["peers"] = {"quantize_seconds": timings, "failed": failed}
    result["notes"] += notes
    result["date"] = dt.date.today().isoformat()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    paths = write_bench(result, out, plot=bool(data), metric=args.plot_metric)
    if not data:
        lines = ["", "| variant | top-1 agreement vs FP32 % | SQNR dB |", "|---|---|---|"]
        for row in result["variants"]:
            f = row["fidelity_vs_fp32"]
            lines.append(f"| {row['name']} | {f['top1_agreement']:.1f} | {f['sqnr_db']:.1f} |")
        with open(paths["md"], "a") as fh:
            fh.write("\n".join(lines) + "\n")
        write_json(paths["json"], result)
    print(Path(paths["md"]).read_text())
    print(f"total {result['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
