"""Which channel counts do the INT8 kernels like? Latency of one conv block as its width steps through 8/16/32/64.

A pruned layer keeps a multiple of ``prune.round_to`` channels. Whether 8 is enough or 16/32/64 pays depends on
how the runtime's INT8 kernels block channels (oneDNN in OpenVINO, MLAS in ONNX Runtime) on this CPU's vector
width. The block: 1x1 conv 64->C, 3x3 conv C->C, 1x1 conv C->64 (ReLU between), at 16x16, batch 32 — the shape of
a ResNet/EfficientNet middle stage. Every width is quantized (NNCF for OpenVINO, deploykit's quantize_onnx settings
for ONNX Runtime) and all widths of a runtime are timed side by side in alternating blocks; the table gives each
width's latency per channel relative to the widest multiple of 64, so a width the kernels pad up shows as dearer.

Usage:
    python bench/channel_rounding.py --widths 96-128 --out bench/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import stamped, write_results  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="96-128", help="a range lo-hi (every multiple of 4) or a comma list")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runtimes", default="openvino-int8,onnxruntime-int8")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return ap.parse_args(argv)


def widths(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1, 4))
    return [int(v) for v in text.split(",")]


def block(c: int):
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(64, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Conv2d(c, 64, 1)).eval()


def build(runtime: str, c: int, calib: np.ndarray, work: Path):
    from deploykit.backends import create_backend
    from deploykit.stages.export_onnx import export_onnx

    onnx = export_onnx(block(c), work / f"c{c}.onnx", tuple(calib.shape[1:]))
    if runtime == "openvino-int8":
        from deploykit.stages.quantize_openvino import quantize_openvino

        return create_backend("openvino", quantize_openvino(onnx, work / f"c{c}.xml", calib), precision="int8").run
    from deploykit.stages.quantize_onnx import quantize_onnx

    path = quantize_onnx(onnx, work / f"c{c}.int8.onnx", [calib[i:i + 4] for i in range(0, len(calib), 4)])
    return create_backend("onnxruntime", path).run


def main(argv=None) -> int:
    import torch

    from deploykit.measure import time_variants

    args = parse_args(argv)
    torch.manual_seed(0)
    calib = np.random.default_rng(0).normal(size=(16, 64, args.size, args.size)).astype(np.float32)
    x = np.resize(calib, (args.batch, *calib.shape[1:])).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtimes.split(","):
            fns = {c: build(runtime, c, calib, Path(tmp)) for c in widths(args.widths)}
            run = time_variants({str(c): f for c, f in fns.items()}, x, max_rounds=args.rounds, min_rounds=args.rounds,
                                eliminate=False)
            ms = {int(n): rec.p50 for n, rec in run.records.items()}
            ref = max(c for c in ms if c % 64 == 0) if any(c % 64 == 0 for c in ms) else max(ms)
            for c, v in ms.items():
                rows.append({"runtime": runtime, "channels": c, "p50_ms": round(v, 4),
                             "per_channel_vs_ref": round((v / c) / (ms[ref] / ref), 3),
                             "multiple_of": max(m for m in (4, 8, 16, 32, 64) if c % m == 0)})
    write_results(args.out, "channel_rounding", stamped("bench/channel_rounding.py", rows=rows), markdown)
    return 0


def markdown(res: dict) -> str:
    lines = [f"# INT8 latency of one conv block by channel count ({res['created'][:10]})", "",
             f"Measured on {res['machine']}.", "", "```", res["command"], "```", "",
             "| runtime | channels | largest power-of-2 divisor | p50 ms | ms per channel vs the multiple of 64 |",
             "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['runtime']} | {r['channels']} | {r['multiple_of']} | {r['p50_ms']:.3f} | "
                     f"{r['per_channel_vs_ref']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
