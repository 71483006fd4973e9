"""Which latency target buys which speedup over the best peer: prune to several targets, time each beside the peer.

For one model, in one process: the prune stage's latency-targeted pruning (``deploykit.prune_latency`` with the
stage's default settings: OpenVINO INT8 probe at batch 32, output-KL cost) at each ``--targets`` value, no
fine-tuning (speed does not depend on the weights' values); each pruned model exported the way the chain exports
it and run on OpenVINO INT8 (the chain's NNCF settings) and OpenVINO BF16 (where the CPU has native BF16), timed
side by side with the peer (OpenVINO + NNCF INT8 of the original, defaults) and the unpruned original at batch 1 and
32, alternating blocks. Speedup = the peer's latency / the variant's, paired by round (``deploykit.measure.Ratio``:
the median of per-round ratios, so a machine that changes speed between rounds cancels). Accuracy is not here: it
needs the fine-tuning (``bench/beat_the_peer.py``). Use it to pick the least pruning that reaches a speed goal: less pruning keeps more
accuracy.

Usage:
    python bench/latency_target_curve.py --model lite0 --targets 0.5x,0.6x,0.65x,0.75x --out bench/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from beat_the_peer import MODELS, build_peer  # noqa: E402
from results_io import stamped, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0", choices=sorted(MODELS))
    ap.add_argument("--targets", default="0.5x,0.6x,0.65x,0.75x")
    ap.add_argument("--calibration-images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=12, help="most timing rounds per batch size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deploykit-latency-curve"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import copy

    from deploykit.backends import create_backend
    from deploykit.checkpoint import load_checkpoint
    from deploykit.data import resolve_data
    from deploykit.data.synthetic import native_bf16
    from deploykit.measure import time_variants
    from deploykit.preprocessing import resolve_preprocessing
    from deploykit.recipe import DataConfig
    from deploykit.stages.prune import Prune, count_macs_params, prune_to_latency_target
    from deploykit.stages.quantize_openvino import quantize_openvino
    from peers import fp32_onnx

    args = parse_args(argv)
    ckpt_s, data_name = MODELS[args.model][:2]
    loaded = load_checkpoint(ROOT / ckpt_s)
    pre, model = resolve_preprocessing(loaded), loaded.model.eval()
    data = resolve_data(DataConfig(name=data_name, calibration_images=args.calibration_images))
    calib = data.calibration.load(pre, np.arange(min(args.calibration_images, len(data.calibration))))
    size = pre.input_size
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    precisions = ["int8"] + (["bf16"] if native_bf16() else [])

    fns = {"peer": create_backend("openvino", build_peer(ROOT / ckpt_s, pre, calib, work), precision="int8").run}
    original_onnx = fp32_onnx(copy.deepcopy(model), size, work / "original.onnx")
    for p in precisions[1:]:
        fns[f"original {p}"] = create_backend("openvino", original_onnx, precision=p).run
    macs0 = count_macs_params(model, size)[0]
    pruned_facts = {}
    for t in [s.strip() for s in args.targets.split(",") if s.strip()]:
        pruned, facts = prune_to_latency_target(model, size, calib, Prune.Config(target_latency=t))
        pruned_facts[t] = {"probe_measured_ratio": facts["measured_ratio"], "unit_ratios": facts["unit_ratios"],
                           "macs_kept": round(count_macs_params(pruned, size)[0] / macs0, 4)}
        onnx = fp32_onnx(pruned, size, work / f"pruned_{t}.onnx")
        fns[f"{t} int8"] = create_backend("openvino", quantize_openvino(onnx, work / f"pruned_{t}.xml", calib),
                                          precision="int8").run
        for p in precisions[1:]:
            fns[f"{t} {p}"] = create_backend("openvino", onnx, precision=p).run
        print(f"{t}: probe measured {facts['measured_ratio']:.3f}x, MACs kept {pruned_facts[t]['macs_kept']:.2f}",
              flush=True)

    timing, speedup = {}, {}
    for bs in (1, 32):
        x = data.calibration.load(pre, np.arange(bs))
        run = time_variants(fns, x, max_rounds=args.rounds, min_rounds=6, eliminate=False, time_budget_s=60.0)
        timing[bs] = {k: rec.to_dict() for k, rec in run.records.items()}
        speedup[bs] = {k: run.ratio("peer", k).value for k in fns}
    rows = []
    for name in fns:
        target, _, precision = name.rpartition(" ")
        rows.append({"variant": name, "target": target or None, "precision": precision or "int8",
                     **pruned_facts.get(target, {}),
                     **{f"speedup_vs_peer_bs{bs}": round(speedup[bs][name], 3) for bs in (1, 32)},
                     "p50_ms": {f"bs{bs}": timing[bs][name]["p50"] for bs in (1, 32)},
                     "p50_interval_ms": {f"bs{bs}": timing[bs][name]["p50_interval"] for bs in (1, 32)}})
    write_results(args.out, f"latency_target_curve_{args.model}",
                  stamped("bench/latency_target_curve.py", model=args.model, checkpoint=ckpt_s, rows=rows), markdown)
    return 0


def markdown(res: dict) -> str:
    lines = [f"# Latency target vs speedup over OpenVINO + NNCF INT8 of the original: {res['model']} "
             f"({res['created'][:10]})", "", f"Measured on {res['machine']}.", "", "```", res["command"], "```", "",
             "| variant | probe measured (OpenVINO INT8 bs32) | MACs kept | speedup vs peer bs1 | bs32 | "
             "p50 ms bs1 / bs32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        probe = f"{r['probe_measured_ratio']:.3f}x" if "probe_measured_ratio" in r else "-"
        macs = f"{r['macs_kept']:.2f}" if "macs_kept" in r else "-"
        lines.append(f"| {r['variant']} | {probe} | {macs} | {r['speedup_vs_peer_bs1']:.2f}x | "
                     f"{r['speedup_vs_peer_bs32']:.2f}x | {r['p50_ms']['bs1']:.3f} / {r['p50_ms']['bs32']:.3f} |")
    lines += ["", "No fine-tuning: speed only (the weights' values do not change the kernels). Target = the prune "
              "stage's `target_latency` on its OpenVINO INT8 probe at batch 32 (relative to the unpruned model); "
              "each target is pruned by the stage's own allocation. All variants timed side by side in alternating "
              "blocks in one run per batch size; speedup = the peer's latency / the variant's, the median of per-round "
              "ratios (blocks of the same round run a fraction of a second apart).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
