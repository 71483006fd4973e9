"""Compression sweep: prune ratio x precision on one checkpoint, every variant timed in one run, one Pareto plot.

For each prune ratio (0 = unpruned; the others only when the `prune` stage is registered) one artifact
is built with fuse_bn [, prune, <recovery stage>], export_onnx, quantize_onnx, quantize_openvino (when
registered); the precisions come from that artifact's models: FP32 and INT8 on ONNX Runtime and
OpenVINO, OpenVINO BF16 where the CPU has it. All variants of all artifacts are then timed
*interleaved in one process* (deploykit.benchmark.benchmark_variants) and evaluated on the same images.

Usage:
    python bench/sweep.py models/resnet10t_fmnist.pth --ratios 0,0.3,0.5 --recover distill --recover-epochs 2 \
        --recover-images 20000 --batch 1,32 --out bench/results/sweep_reference
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deploykit import compress
from deploykit.artifact import Artifact
from deploykit.benchmark import benchmark_variants, discover_variants, eval_data, write_bench
from deploykit.recipe import parse_recipe
from deploykit.stages import STAGES


def recipe_for(ratio: float, recover: str | None, calibration_images: int, recover_config: dict | None = None) -> dict:
    stages: list = ["fuse_bn"]
    if ratio > 0:
        stages.insert(0, {"prune": {"ratio": ratio}})  # prune the float model before BN is folded away
        if recover:
            stages.insert(1, {recover: recover_config} if recover_config else recover)
    stages += [{"export_onnx": {"opset": 17}}, {"quantize_onnx": {"method": "minmax", "per_channel": True}}]
    if "quantize_openvino" in STAGES:
        stages.append("quantize_openvino")
    return {"version": 1, "name": f"sweep-prune{ratio:g}", "description": "bench/sweep.py", "target": "cpu",
            "data": {"calibration_images": calibration_images}, "stages": stages, "eval": {"enabled": False}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ratios", default="0,0.3,0.5")
    ap.add_argument("--recover", default=None, help="stage run after prune to recover accuracy (e.g. distill)")
    ap.add_argument("--recover-epochs", type=int, default=None, help="epochs of the recovery stage (its default if unset)")
    ap.add_argument("--recover-images", type=int, default=None, help="training images per epoch of the recovery stage")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--out", default="bench/results/sweep")
    ap.add_argument("--work", default="/tmp/deploykit-sweep", help="where the sweep's artifacts are built")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts already built under --work")
    ap.add_argument("--plot-metric", choices=("p50", "cpu_p50"), default="cpu_p50",
                    help="x axis: wall p50 or CPU time per call (the stable one on a shared machine)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ratios = [float(r) for r in args.ratios.split(",")]
    notes = []
    if any(r > 0 for r in ratios) and "prune" not in STAGES:
        notes.append(f"prune stage not registered in this deploykit: ratios {[r for r in ratios if r > 0]} skipped")
        ratios = [r for r in ratios if r == 0]
    if args.recover and args.recover not in STAGES:
        notes.append(f"recovery stage {args.recover!r} not registered: pruned models are not fine-tuned")
        args.recover = None
    if any(r > 0 for r in ratios) and not args.recover:
        notes.append("pruned models are NOT fine-tuned after pruning (no --recover stage): their accuracy is the "
                     "raw post-pruning accuracy")
    variants, skipped, pre, arts = [], [], None, {}
    for ratio in ratios:
        out = Path(args.work) / f"prune{ratio:g}.deploykit"
        rc = {k: v for k, v in (("epochs", args.recover_epochs), ("max_train_images", args.recover_images)) if v}
        recipe = parse_recipe(recipe_for(ratio, args.recover, args.calibration_images, rc), "bench/sweep.py")
        print(f"== building prune ratio {ratio:g}: {[s.name for s in recipe.stages]}", flush=True)
        if not (args.reuse and (out / "manifest.json").is_file()):
            compress(args.checkpoint, recipe, out=out, overwrite=True, data__name=args.data)
        art = Artifact.open(out)
        arts[ratio] = art
        pre = pre or art.preprocessing
        vs, sk = discover_variants(art, args.backends.split(","), threads=args.threads)
        for v in vs:
            v.name, v.group = f"prune{ratio:g} {v.name}", f"prune ratio {ratio:g}"
        variants += vs
        skipped += [{**s, "name": f"prune{ratio:g} {s['name']}"} for s in sk]
    eval_set, _ = eval_data(arts[ratios[0]], args.data, args.eval_images)
    result = benchmark_variants(variants, pre, eval_set, [int(b) for b in args.batch.split(",")], runs=args.runs,
                                budget_s=args.budget, skipped=skipped)
    result["artifact"] = {"path": f"sweep of {Path(args.checkpoint).name}", "ratios": ratios,
                          "stages": {f"{r:g}": [s["name"] for s in arts[r].manifest["lineage"]] for r in ratios},
                          "prune_facts": {f"{r:g}": next((s.get("config") for s in arts[r].manifest["lineage"]
                                                          if s["name"] == "prune"), None) for r in ratios}}
    result["notes"] += notes
    result["sweep_seconds"] = round(time.perf_counter() - t0, 1)
    paths = write_bench(result, args.out, metric=args.plot_metric)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    print(Path(paths["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
