"""Prune 50% MACs + KD + INT8 on the long-tailed EfficientNet-Lite0 reference; with and without class-balanced
sampling. INT8 is PTQ + accuracy guard (--recipe prune-kd-int8) or QAT (--recipe prune-kd-qat-int8). Uses only
deploykit's public functions.

Usage:
    nice -n 10 python bench/prune_kd_lite0.py --checkpoint models/efficientnet_lite0_fmnist_lt.pth \
        --epochs 2 --max-train-images 4000 --eval-images 2000 --balance none sampler      # prune_kd_lite0.md
    python bench/prune_kd_lite0.py --recipe prune-kd-qat-int8 --epochs 4 --max-train-images 0 \
        --eval-images 10000 --balance sampler --results bench/results/prune_kd_qat_lite0    # prune_kd_qat_lite0.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def one_run(args, balance: str, rank_always: bool) -> dict:
    from deploykit.api import compress
    from deploykit.artifact import Artifact
    from deploykit.checkpoint import load_checkpoint
    from deploykit.data import resolve_data
    from deploykit.evaluate import predict
    from deploykit.backends import create_backend
    from deploykit.forgetting import forgetting_markdown, forgetting_report
    from deploykit.guard import sensitivity_markdown
    from deploykit.recipe import DataConfig, load_recipe

    out = Path(args.out_dir) / f"lite0_{args.recipe}_{balance}.deploykit"
    t0 = time.time()
    stages = {s.name for s in load_recipe(args.recipe).stages}
    cap = args.max_train_images or None  # 0 = the whole train split
    overrides = dict(data__name="fashion-mnist-lt", data__eval_images=args.eval_images,
                     data__calibration_images=256, eval__latency_runs=args.latency_runs,
                     stages__prune__macs_reduction=args.macs_reduction,
                     stages__distill__epochs=args.epochs, stages__distill__max_train_images=cap,
                     stages__distill__balance=balance, stages__distill__threads=args.threads,
                     stages__distill__lr=args.lr)
    if "accuracy_guard" in stages:
        overrides.update(stages__accuracy_guard__max_drop=args.max_drop,
                         stages__accuracy_guard__images=args.guard_images,
                         stages__accuracy_guard__rank_always=rank_always)
    if "select_runtime" in stages:
        overrides.update(stages__select_runtime__objective=args.objective)
    if "qat" in stages:
        # --max-drop is the budget select_runtime holds the QAT variants to (as `deploykit compress --max-drop`)
        overrides.update(stages__qat__balance=balance, stages__qat__threads=args.threads,
                         stages__qat__max_train_images=cap, stages__select_runtime__max_top1_drop=args.max_drop)
    res = compress(args.checkpoint, args.recipe, out=out, overwrite=True, **overrides)
    rep = res.report
    # forgetting: the same eval images through the original (torch) and the artifact's final model
    data = resolve_data(DataConfig(name="fashion-mnist-lt", eval_images=args.eval_images))
    art = Artifact.open(out)
    pre = art.preprocessing
    orig = create_backend("torch", load_checkpoint(args.checkpoint).model.eval())
    lo, lc = predict(orig, data.eval, pre), predict(art.backend(), data.eval, pre)
    forg = forgetting_report(data.eval.labels, lo, lc, pre.class_names)
    # the speed bar: the ORIGINAL (unpruned) model as FP32 ONNX vs the final artifact, batch 32,
    # on the same input, in alternating blocks so machine noise hits all alike
    from peers import original_fp32_onnx

    from deploykit.measure import time_variants

    orig_onnx = original_fp32_onnx(args.checkpoint, pre.input_size, out.parent / "lite0_original.fp32.onnx")
    ref_b, new_b = create_backend("onnxruntime", orig_onnx), art.backend()
    ref_ov = create_backend("openvino", orig_onnx)  # the same-runtime comparison, when the artifact runs OpenVINO
    x32 = data.eval.load(pre, np.arange(32))
    # alternating blocks, not run-by-run interleaving: one runtime's spinning thread pool must not tax the other
    lat = time_variants({"original_fp32_onnx": ref_b.run, "original_fp32_openvino": ref_ov.run,
                         "compressed": new_b.run}, x32, max_rounds=30, block_runs=max(1, args.latency_runs // 4),
                        warmup=2, time_budget_s=150, eliminate=False).records
    m = rep["models"]
    row = {
        "balance": balance, "seconds": round(time.time() - t0, 1), "artifact": str(out),
        "fp32_top1": m["original"]["top1"], "fp32_macro_f1": m["original"]["macro_f1"],
        "compressed_top1": m["compressed"]["top1"], "compressed_macro_f1": m["compressed"]["macro_f1"],
        "top1_drop": round(m["original"]["top1"] - m["compressed"]["top1"], 3),
        "macro_f1_drop": round(m["original"]["macro_f1"] - m["compressed"]["macro_f1"], 3),
        "latency_ms": {k: m[k].get("latency_ms") for k in m},
        "speedup": m["compressed"].get("speedup"),
        "bs32_vs_original_fp32_onnx": {"original_fp32_onnx_ms": lat["original_fp32_onnx"].p50,
                                       "original_fp32_openvino_ms": lat["original_fp32_openvino"].p50,
                                       "compressed_ms": lat["compressed"].p50, "runs": lat["compressed"].runs,
                                       "compressed_runtime": new_b.info().get("backend"),
                                       "speedup": round(lat["original_fp32_onnx"].p50 / lat["compressed"].p50, 3),
                                       "speedup_vs_original_on_openvino":
                                           round(lat["original_fp32_openvino"].p50 / lat["compressed"].p50, 3)},
        "prune": {k: v for k, v in rep["stage_facts"]["prune"].items() if k != "search"},
        "distill": {k: v for k, v in rep["stage_facts"]["distill"].items() if k != "history"},
        "distill_history": rep["stage_facts"]["distill"]["history"],
        "max_drop": args.max_drop, "recipe": args.recipe, "chosen_runtime": rep["stage_facts"].get("select_runtime", {}).get("chosen"),
        "guard": rep["stage_facts"].get("accuracy_guard"),
        "qat": {k: v for k, v in rep["stage_facts"].get("qat", {}).items() if k != "history"} or None,
        "forgetting": forg,
        "environment": rep.get("environment"),
        "notes": rep.get("notes"),
    }
    row["markdown"] = forgetting_markdown(forg) + ("\n" + sensitivity_markdown(row["guard"]) if row["guard"] else "")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="models/efficientnet_lite0_fmnist_lt.pth")
    ap.add_argument("--recipe", default="prune-kd-int8", help="prune-kd-int8 (PTQ + guard) or prune-kd-qat-int8")
    ap.add_argument("--out-dir", default="/tmp/deploykit-bench")
    ap.add_argument("--results", default="bench/results/prune_kd_lite0")
    ap.add_argument("--balance", nargs="+", default=["none", "sampler"])
    ap.add_argument("--macs-reduction", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-train-images", type=int, default=4000)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--guard-images", type=int, default=400)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--objective", default="balanced", choices=["balanced", "latency", "throughput"],
                    help="select_runtime's objective (throughput = judged at batch 32, the issue's bar)")
    args = ap.parse_args()
    rows = []
    for i, bal in enumerate(args.balance):
        rows.append(one_run(args, bal, rank_always=(i == 0)))
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.results}.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2, default=str))
        print(json.dumps({k: rows[-1][k] for k in ("balance", "fp32_top1", "compressed_top1", "fp32_macro_f1",
                                                   "compressed_macro_f1", "bs32_vs_original_fp32_onnx", "seconds")}), flush=True)


if __name__ == "__main__":
    main()
