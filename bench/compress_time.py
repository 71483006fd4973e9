"""How long `deploykit compress --int8` takes, stage by stage, and how much memory it needs.

Runs the real command (a child process per run, so start-up and imports count) on:
  * ResNet-50 at 224 (timm, random weights), data-free;
  * the same ResNet-50 (10 classes) with a 1,000-image ImageFolder: Fashion-MNIST test images upscaled to
    224x224 RGB JPEGs, 100 per class (80/20 split: 800 to calibrate from, 200 to evaluate on);
  * the Fashion-MNIST reference (models/resnet10t_fmnist.pth) with --data fashion-mnist (the README's main job);
  * EfficientNet-B0 at 60x80 (timm, random weights, 44 classes: our users' setting), data-free.
Each is run with runtime selection's early stopping (the default) and, with ``--exhaustive``, also with every
candidate timed every round and evaluated (``select_runtime.early_stop=false``, ``evaluate=all``): the two choices
and the speed of each in the exhaustive table are reported side by side.

Writes ``compress_time.json`` / ``.md`` under ``--out``.

    .venv/bin/python bench/compress_time.py --exhaustive --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import stamped, write_results  # noqa: E402

EXHAUSTIVE = ["--set", "stages.select_runtime.early_stop=false", "--set", "stages.select_runtime.evaluate=all",
              "--set", "stages.select_runtime.time_budget_s=240"]


def timm_checkpoint(path: Path, arch: str, num_classes: int, **kw) -> Path:
    import timm
    import torch

    if not path.is_file():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=num_classes, **kw)
        torch.save({"arch": arch, "state_dict": model.state_dict(), "num_classes": num_classes}, path)
    return path


def fashion_imagefolder(root: Path, per_class: int = 100, size: int = 224) -> Path:
    """Fashion-MNIST test images, upscaled to size x size RGB JPEGs, ``per_class`` per class."""
    import numpy as np
    from PIL import Image

    from deploykit.data.fashion_mnist import load_fashion_mnist

    if root.is_dir():
        return root
    test = load_fashion_mnist("test")
    tmp = root.with_name(root.name + ".tmp")
    for c, name in enumerate(test.class_names):
        d = tmp / name.replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(test.labels == c)[:per_class]:
            Image.fromarray(test.images[i]).convert("RGB").resize((size, size), Image.BICUBIC).save(
                d / f"{i}.jpg", quality=90)
    tmp.rename(root)
    return root


def run(label: str, args: list[str], out: Path, extra: list[str]) -> dict:
    """One `deploykit compress` child process: wall time, its own peak RSS, the report's stage times."""
    import time

    cmd = [str(Path(sys.executable).with_name("deploykit")), "compress", *args, "--int8", "--out", str(out),
           "--overwrite", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label}: compress failed:\n{err[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    sel = rep["stage_facts"].get("select_runtime", {})
    rows = {r["name"]: r for r in sel.get("candidates", [])}
    return {"label": label, "command": "deploykit compress " + " ".join([*args, "--int8", *extra]),
            "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "report_total_s": rep["total_seconds"], "stages": {s["name"]: s["seconds"] for s in rep["stages"]},
            "other_s": round(rep["total_seconds"] - sum(s["seconds"] for s in rep["stages"]), 1),
            "chosen": sel.get("chosen"), "timing_stopped": sel.get("timing_stopped"),
            "timing_s": sel.get("timing_seconds"),
            "latency_ms": {n: r["latency_ms"] for n, r in rows.items()},
            "runs": {n: {k: t["runs"] for k, t in r["timing"].items()} for n, r in rows.items()},
            "top1": rep["models"]["compressed"]["top1"], "original_top1": rep["models"]["original"]["top1"]}


def same_choice(fast: dict, full: dict) -> dict:
    """Is the early-stopping choice the exhaustive one, or within 5% of its speed in the exhaustive table?"""
    lat = full["latency_ms"]
    ratio = {k: round(lat[fast["chosen"]][k] / lat[full["chosen"]][k], 3) for k in lat[full["chosen"]]}
    return {"early_stop": fast["chosen"], "exhaustive": full["chosen"], "same": fast["chosen"] == full["chosen"],
            "latency_ratio_in_exhaustive_table": ratio, "within_5pct": all(r <= 1.05 for r in ratio.values())}


def markdown(r: dict) -> str:
    lines = ["# How long `deploykit compress --int8` takes", "", f"Measured {r['created']} on {r['machine']}.", "",
             f"Command: `{r['command']}`", "",
             "| model | wall s | peak RSS GB | " + " | ".join(r["stage_names"]) + " | other s | "
             "shipped | selection timing stopped |", "|---|---|---|" + "---|" * len(r["stage_names"]) + "---|---|---|"]
    for row in r["runs"]:
        st = [str(row["stages"].get(n, "-")) for n in r["stage_names"]]
        stopped = "; ".join(f"{k}: {v}" for k, v in (row["timing_stopped"] or {}).items())
        lines.append(f"| {row['label']} | {row['wall_s']} | {row['peak_rss_gb']} | " + " | ".join(st)
                     + f" | {row.get('other_s', row.get('evaluation_s'))} | {row['chosen']} | {stopped} |")
    if r.get("choices"):
        lines += ["", "## Early stopping vs exhaustive timing (same model, two runs)", "",
                  "| model | early stopping ships | exhaustive ships | same | its latency / exhaustive choice's "
                  "(exhaustive table) | exhaustive wall s |", "|---|---|---|---|---|---|"]
        for c in r["choices"]:
            lines.append(f"| {c['label']} | {c['early_stop']} | {c['exhaustive']} | {'yes' if c['same'] else 'no'} | "
                         + ", ".join(f"{k} {v}" for k, v in c["latency_ratio_in_exhaustive_table"].items())
                         + f" | {c['exhaustive_wall_s']} |")
    lines += ["", "Wall = the whole command in a child process (start-up, loading, stages, evaluation, writing); "
              "stage columns are the report's own stage times; other = the report's total minus its stages (loading the "
              "checkpoint and data, the final report: evaluation and timing reuse select_runtime's, writing); peak RSS "
              "of that process."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exhaustive", action="store_true", help="also run each with exhaustive runtime selection")
    ap.add_argument("--only", default="", help="comma list of labels to run (default: all)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "deploykit-compress-time"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = {
        "resnet50 224 data-free": [str(timm_checkpoint(work / "resnet50.pth", "resnet50", 1000))],
        "resnet50 224 + 1,000-image ImageFolder": [str(timm_checkpoint(work / "resnet50_10.pth", "resnet50", 10)),
                                                  "--data", str(fashion_imagefolder(work / "fmnist_folder"))],
        "reference resnet10t Fashion-MNIST": [str(ROOT / "models/resnet10t_fmnist.pth"), "--data", "fashion-mnist"],
        "efficientnet_b0 60x80 data-free": [str(timm_checkpoint(work / "effb0_44.pth", "efficientnet_b0", 44)),
                                            "--input-size", "60x80"],
    }
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    runs, choices = [], []
    for label, cargs in cases.items():
        if only and not any(o in label for o in only):
            continue
        fast = run(label, cargs, work / "fast.deploykit", [])
        runs.append(fast)
        if args.exhaustive and "efficientnet" not in label:
            full = run(label + " (exhaustive selection)", cargs, work / "full.deploykit", EXHAUSTIVE)
            choices.append({"label": label, **same_choice(fast, full), "exhaustive_wall_s": full["wall_s"],
                            "exhaustive_stages": full["stages"]})
    names = list(dict.fromkeys(n for r in runs for n in r["stages"]))
    write_results(Path(args.out), "compress_time",
                  stamped("bench/compress_time.py", stage_names=names, runs=runs, choices=choices), markdown)


if __name__ == "__main__":
    main()
