"""Model zoo at realistic sizes: what `deploykit compress --int8` ships per family, how fast and how close to FP32.

For each model (timm, random weights, nothing downloaded): save a timm train.py checkpoint, run the ``int8-ptq``
recipe through ``deploykit.compress`` (data-free calibration by default), reopen the artifact and, in one process,
time alternately in blocks (batch 1 and 32):
  * the shipped model on its runtime (``Artifact.open(...).backend()``),
  * PyTorch eager FP32 (the original module),
  * OpenVINO + NNCF INT8 with NNCF's defaults (``nncf.quantize(ov_model, dataset)``, no model type), the
    "just use OpenVINO" peer, calibrated on the same number of seeded Gaussian inputs;
and measure fidelity (SQNR vs the artifact's FP32 ONNX on ONNX Runtime, on held-out Gaussian inputs).
Writes ``model_zoo.json`` and ``model_zoo.md`` under ``--out``.

Random weights have no accuracy and near-tied logits: SQNR is the closeness number (top-1 agreement is printed but
is a coarse signal here). Absolute milliseconds drift on a shared machine; the ratios are timed in the same run.

Reproduce (quiet machine; the full zoo takes a while on 2 cores):
    nice -n 10 .venv/bin/python bench/model_zoo.py
    nice -n 10 .venv/bin/python bench/model_zoo.py --models resnet50,vit_small --out bench/results/model_zoo
    .venv/bin/python bench/model_zoo.py --models resnet18 --quick --out /tmp/zoo      # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploykit import Artifact, DeployKitError, compress  # noqa: E402
from deploykit.backends import create_backend  # noqa: E402
from deploykit.checkpoint import save_timm_checkpoint  # noqa: E402
from deploykit.environment import machine_line, versions  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.measure import time_variants  # noqa: E402

# name -> (family, timm arch, create_model kwargs, (H, W))
MODELS = {
    "resnet18": ("ResNet", "resnet18", {}, (224, 224)),          # smoke-test size; not in the default list
    "resnet50": ("ResNet", "resnet50", {}, (224, 224)),
    "mobilenetv3": ("MobileNetV3", "mobilenetv3_large_100", {}, (224, 224)),
    "efficientnet_b0": ("EfficientNet", "efficientnet_b0", {}, (60, 80)),
    "regnet": ("RegNet", "regnetx_016", {}, (224, 224)),
    "densenet121": ("DenseNet", "densenet121", {}, (224, 224)),
    "dla34": ("DLA", "dla34", {}, (224, 224)),
    "ghostnet": ("GhostNet", "ghostnet_100", {}, (224, 224)),
    "convnext_tiny": ("ConvNeXt", "convnext_tiny", {}, (224, 224)),
    "vit_small": ("ViT", "vit_small_patch16_224", {}, (224, 224)),
    "deit_small": ("DeiT", "deit_small_patch16_224", {}, (224, 224)),
    "swin_tiny": ("Swin", "swin_tiny_patch4_window7_224", {}, (224, 224)),
    "mobilevitv2": ("MobileViT-v2", "mobilevitv2_100", {}, (256, 256)),
    "efficientvit_b1": ("EfficientViT", "efficientvit_b1", {}, (224, 224)),
    "levit_256": ("LeViT", "levit_256", {}, (224, 224)),
}
DEFAULT = [m for m in MODELS if m != "resnet18"]
BATCHES = (1, 32)
SETTINGS = {
    # what a user gets from `deploykit compress ckpt.pth --int8` (data-free), minus the final evaluation
    # (its latency table repeats what this script times, and data-free it has no accuracy to report)
    "full": dict(eval__enabled=False),
    "quick": dict(eval__enabled=False, data__synthetic_images=8, data__synthetic_steps=1, data__check_images=8,
                  stages__quantize_openvino__subset_size=8, stages__select_runtime__rounds=1,
                  stages__select_runtime__block_runs=1, stages__select_runtime__time_budget_s=5),
}
TIMING = {"full": dict(max_rounds=6, block_runs=5, warmup=1, time_budget_s=60.0),
          "quick": dict(max_rounds=2, block_runs=1, warmup=1, time_budget_s=5.0)}


def build_checkpoint(name: str, tmp: Path):
    import timm
    import torch

    family, arch, kwargs, (h, w) = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=1000, **kwargs).eval()
    path = tmp / f"{name}.pth"
    save_timm_checkpoint(path, arch=arch, state_dict=model.state_dict(),
                         args={"num_classes": 1000, "in_chans": 3, "input_size": (3, h, w), "model_kwargs": kwargs})
    return model, path


def nncf_default(fp32_onnx: Path, dst: Path, calib: np.ndarray) -> Path:
    """The peer: OpenVINO model quantized by NNCF with its defaults (no model type, default preset)."""
    import nncf
    import openvino as ov

    quantized = nncf.quantize(ov.Core().read_model(str(fp32_onnx)), nncf.Dataset([calib[i:i + 1] for i in
                                                                                   range(len(calib))]),
                              subset_size=len(calib))
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst


def run_one(name: str, tmp: Path, mode: str, threads: int | None) -> dict:
    import torch

    family, arch, kwargs, (h, w) = MODELS[name]
    row = {"model": name, "family": family, "arch": arch, "input": f"3x{h}x{w}"}
    model, ckpt = build_checkpoint(name, tmp)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    t0 = time.perf_counter()
    try:
        res = compress(ckpt, "int8-ptq", out=tmp / f"{name}.deploykit", overwrite=True, **SETTINGS[mode])
    except DeployKitError as err:
        row.update(error=f"compress refused: {err}", compress_s=round(time.perf_counter() - t0, 1))
        return row
    row["compress_s"] = round(time.perf_counter() - t0, 1)
    facts = res.report["stage_facts"]
    sel = facts["select_runtime"]
    row.update(chosen=sel["chosen"], reason=sel["reason"], withheld=sel.get("withheld", {}),
               model_type=facts["quantize_onnx"].get("model_type"),
               candidates={r["name"]: {"sqnr_db": r["sqnr_db"], "verdict": r["verdict"]} for r in sel["candidates"]})

    art = Artifact.open(res.path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8 if mode == "quick" else 64, 3, h, w)).astype(np.float32)
    held_out = np.random.default_rng(1).standard_normal((8 if mode == "quick" else 32, 3, h, w)).astype(np.float32)
    fp32 = art.path / "model.fp32.onnx"
    peer_path = nncf_default(fp32, tmp / f"{name}.nncf_default.xml", calib)
    shipped = art.backend(threads=threads)
    peer = create_backend("openvino", peer_path, threads=threads, precision="int8")
    ref = create_backend("onnxruntime", fp32, threads=threads).run(held_out)
    for key, be in (("shipped", shipped), ("openvino-nncf-default", peer)):
        fid = fidelity(ref, be.run(held_out))
        row[f"sqnr_db_{key}"] = fid["sqnr_db"]
        row[f"top1_agreement_{key}"] = fid["top1_agreement"]

    if threads:
        torch.set_num_threads(threads)

    def torch_run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    fns = {"shipped": shipped.run, "torch-eager-fp32": torch_run, "openvino-nncf-default": peer.run}
    row["latency_ms"] = {n: {} for n in fns}
    for bs in BATCHES:
        x = np.resize(held_out, (bs, 3, h, w)).astype(np.float32)
        for n, st in time_variants(fns, x, eliminate=False, **TIMING[mode]).records.items():
            row["latency_ms"][n][f"bs{bs}"] = st.p50
    lat = row["latency_ms"]
    row["speedup_vs_torch"] = {k: round(lat["torch-eager-fp32"][k] / v, 2) for k, v in lat["shipped"].items()}
    row["speedup_vs_nncf_default"] = {k: round(lat["openvino-nncf-default"][k] / v, 2)
                                      for k, v in lat["shipped"].items()}
    return row


def render(rec: dict) -> str:
    lines = [f"# Model zoo: `deploykit compress --int8` per family ({rec['mode']})", "",
             f"- date: {rec['date']}", f"- machine: {rec['machine']}", f"- threads: {rec['threads'] or 'default'}",
             f"- load: {rec['load']}", f"- command: `{rec['command']}`", *(f"- note: {n}" for n in rec["notes"]), "",
             "| family | model | input | compress s | shipped | bs1 vs torch | bs32 vs torch | bs1 vs NNCF default "
             "| bs32 vs NNCF default | SQNR shipped dB | SQNR NNCF default dB | withheld |",
             "|---" * 12 + "|"]
    for r in rec["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['arch']} | {r['input']} | {r.get('compress_s', '')} | "
                         f"error: {r['error']} | | | | | | | |")
            continue
        st, sn = r["speedup_vs_torch"], r["speedup_vs_nncf_default"]
        lines.append(f"| {r['family']} | {r['arch']} | {r['input']} | {r['compress_s']} | {r['chosen']} | "
                     f"{st.get('bs1', '')}x | {st.get('bs32', '')}x | {sn.get('bs1', '')}x | {sn.get('bs32', '')}x | "
                     f"{r['sqnr_db_shipped']} | {r['sqnr_db_openvino-nncf-default']} | "
                     f"{', '.join(r['withheld']) or '-'} |")
    lines += ["", "Ratios > 1: the shipped model is faster. Why each runtime shipped:", ""]
    lines += [f"- {r['arch']}: {r['reason']}" for r in rec["rows"] if "reason" in r]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="few calibration inputs and timing rounds (a smoke test)")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: physical cores)")
    p.add_argument("--out", default=str(ROOT / "bench/results/model_zoo"))
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    mode = "quick" if args.quick else "full"
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== {name}", flush=True)
            try:
                rows.append(run_one(name, Path(tmp), mode, args.threads))
            except Exception as err:  # one model's failure is a row, not the end of the zoo
                family, arch, _, (h, w) = MODELS[name]
                rows.append({"model": name, "family": family, "arch": arch, "input": f"3x{h}x{w}",
                             "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})
            print(json.dumps(rows[-1], default=str)[:600], flush=True)
    rec = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
           "machine": machine_line(), "versions": versions(), "threads": args.threads,
           "load": f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
           "command": " ".join(["python bench/model_zoo.py", *(argv if argv is not None else sys.argv[1:])]),
           "notes": ["random weights, data-free: deploykit calibrates on inputs synthesized from BatchNorm statistics "
                     "(Gaussian for BN-free models), the NNCF-default peer on the same number of seeded Gaussian "
                     "inputs; fidelity on held-out Gaussian inputs (the distribution the peer was calibrated on, "
                     "so the SQNR comparison leans its way on BatchNorm models)",
                     "compress wall time excludes the final evaluation (eval disabled), includes runtime selection",
                     f"timing: {TIMING[mode]} per batch size, all three timed alternately in blocks in one process"],
           "settings": SETTINGS[mode], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_zoo.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    (out / "model_zoo.md").write_text(render(rec))
    print(render(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
