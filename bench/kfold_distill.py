"""A multi-seed ensemble distilled into one single-view student, on Fashion-MNIST.

Three timm resnet10t models trained with three seeds (the reference, models/resnet10t_fmnist.pth, seed 42, and two
more trained here with models/train_reference.py, same recipe); their averaged logits teach the reference model
(`deploykit compress models/resnet10t_fmnist.pth --recipe bench/recipes/kd-ensemble.yaml --set
stages.distill.teachers=[...] --data fashion-mnist`). Reported on the 10,000 test images: each teacher, the
ensemble (3x the cost) and the student (1x), top-1 and macro-F1.

    .venv/bin/python bench/kfold_distill.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploykit.artifact import Artifact  # noqa: E402
from deploykit.checkpoint import load_checkpoint  # noqa: E402
from deploykit.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from deploykit.environment import machine_line, versions  # noqa: E402
from deploykit.evaluate import classification_metrics  # noqa: E402

REFERENCE = ROOT / "models/resnet10t_fmnist.pth"
METRICS = ("top1", "macro_f1", "per_class_f1")


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + 512])).numpy() for i in range(0, len(x), 512)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2", help="seeds of the teachers trained here (the reference is seed 42)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "deploykit-kfold"))
    ap.add_argument("--reuse", action="store_true", help="keep a student already distilled in --work")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teachers = [REFERENCE]
    for seed in args.seeds.split(","):
        path = work / f"resnet10t_seed{seed}.pth"
        if not path.is_file():
            subprocess.run([sys.executable, str(ROOT / "models/train_reference.py"), "--seed", seed, "--out", str(path)],
                           check=True)
        teachers.append(path)
    out = work / "student.deploykit"
    if not (args.reuse and (out / "manifest.json").is_file()):
        subprocess.run([str(Path(sys.executable).with_name("deploykit")), "compress", str(REFERENCE), "--recipe",
                        str(ROOT / "bench/recipes/kd-ensemble.yaml"), "--data", "fashion-mnist", "--out", str(out),
                        "--overwrite", "--set", "stages.distill.teachers=[" + ", ".join(map(str, teachers)) + "]"],
                       check=True)
    art = Artifact.open(out)
    pre = art.preprocessing
    test = load_fashion_mnist("test")
    x = pre.from_uint8(test.images)
    k = len(pre.class_names)
    rows, logits = [], []
    for i, path in enumerate(teachers):
        lg = torch_logits(load_checkpoint(path).model, x)
        logits.append(lg)
        rows.append({"model": f"teacher {i} ({Path(path).name})", "cost": "1x",
                     **{m: classification_metrics(lg, test.labels, k)[m] for m in METRICS}})
    ens = np.mean(logits, axis=0)
    rows.append({"model": f"ensemble of {len(teachers)} (logits averaged)", "cost": f"{len(teachers)}x",
                 **{m: classification_metrics(ens, test.labels, k)[m] for m in METRICS}})
    student = art.backend().run(x)
    rows.append({"model": "student: the reference distilled from the ensemble (FP32 ONNX)", "cost": "1x",
                 **{m: classification_metrics(student, test.labels, k)[m] for m in METRICS}})
    best = max(r["top1"] for r in rows[:len(teachers)])
    verdict = {"student_minus_best_teacher": round(rows[-1]["top1"] - best, 3),
               "student_minus_ensemble": round(rows[-1]["top1"] - rows[-2]["top1"], 3)}
    result = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_line(),
              "command": "python bench/kfold_distill.py " + " ".join(sys.argv[1:]), "versions": versions(),
              "rows": rows, **verdict, "distill": art.report["stage_facts"]["distill"]}
    lines = ["# A multi-seed ensemble distilled into one student (Fashion-MNIST, 10,000 test images)", "",
             f"Measured {result['created']} on {result['machine']}.", "", f"Command: `{result['command']}`", "",
             "| model | inference cost | top-1 % | macro-F1 % |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['cost']} | {r['top1']:.2f} | {r['macro_f1']:.2f} |" for r in rows]
    lines += ["", f"Student - best teacher: {verdict['student_minus_best_teacher']:+.2f} top-1 points; student - "
              f"ensemble: {verdict['student_minus_ensemble']:+.2f}. Distillation: best epoch "
              f"{result['distill'].get('best_epoch')} of {len(result['distill'].get('history', []))} (EMA weights, "
              f"chosen on held-out train images), {result['distill'].get('train_images')} train images."]
    short = ["teacher 0", "teacher 1", "teacher 2", "ensemble", "student"][:len(rows)] if len(rows) == 5 else \
        [r["model"] for r in rows]
    lines += ["", "Per-class F1 (%):", "", "| class | " + " | ".join(short) + " |", "|---|" + "---|" * len(rows)]
    for c, name in enumerate(pre.class_names):
        lines.append(f"| {name} | " + " | ".join(f"{r['per_class_f1'][c]:.2f}" for r in rows) + " |")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "kfold_distill.json").write_text(json.dumps(result, indent=2) + "\n")
    (outdir / "kfold_distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
