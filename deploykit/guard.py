"""Accuracy budget for INT8: rank layers by quantization sensitivity, keep the worst in float until within budget.

After ``quantize_onnx``, the ``accuracy_guard`` stage measures the top-1 drop of the INT8 model vs the
FP32 ONNX model. If it exceeds ``max_drop`` points, each Conv/Gemm/MatMul node is scored by how much
of the INT8 model's logit error disappears when *only that node* stays in float ("quantize all but
one"), and the most sensitive nodes are added to ``nodes_to_exclude`` one by one, re-quantizing each
time, until the drop is within budget. Calibration runs once (ONNX Runtime's calibration cache), so
each re-quantization is only a graph rewrite.

Which images judge the drop: never the evaluation split (the report's accuracy would then be tuned
on the test set). The guard uses the validation slice the ``distill`` stage held out of the train
split when there is one (images no stage trained on), otherwise a seeded slice of the train split.
With no data at all, the FP32 model's own predictions on the check inputs serve as labels (the drop
is then 100 - top-1 agreement).

Example:
    >>> res = guard_quantization(fp32, workdir, calib, x, y, max_drop=0.5)
    >>> res["kept_float"], res["drop"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np
from pydantic import Field

from .stages.config import StageConfig

RANKED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
GUARDED_FILE = "model.int8.guarded.onnx"


class GuardConfig(StageConfig):
    max_drop: float = Field(1.0, ge=0, description="allowed top-1 drop vs FP32 ONNX, in points")
    images: int = Field(1000, ge=16, description="held-out TRAIN images that judge the drop")
    rank_always: bool = Field(True, description="compute the sensitivity table even when within budget")
    max_kept: int | None = Field(None, ge=1, description="most nodes kept in float; None = as many as needed")
    latency_batch: int = Field(32, ge=1)
    latency_runs: int = Field(10, ge=3)
    batch_size: int = Field(64, ge=1)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
                           for i in range(0, len(x), batch_size)]).astype(np.float32)


class Requantizer:
    """Preprocess + calibrate once; then quantize with any exclusion list in about a second."""

    def __init__(self, fp32: Path, workdir: Path, calibration: Iterable[np.ndarray], *, method: str = "minmax",
                 per_channel: bool = True, activation_type: str = "uint8", weight_type: str = "int8",
                 reduce_range: bool = True, op_types: list[str] | None = None, input_name: str = "input"):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pre = self.dir / "guard.preprocessed.onnx"
        quant_pre_process(str(fp32), str(self.pre), skip_symbolic_shape=True)
        self.cache = self.dir / "guard.calibration.json"
        self.cache.unlink(missing_ok=True)
        self.kw = dict(method=method, per_channel=per_channel, activation_type=activation_type,
                       weight_type=weight_type, reduce_range=reduce_range, op_types=op_types)
        self.input_name = input_name
        self._calibration = list(calibration)
        self.quantize([], self.dir / "guard.all.onnx")   # fills the calibration cache

    def nodes(self) -> list[tuple[str, str]]:
        """(name, op_type) of every node of the preprocessed graph, in graph order."""
        import onnx

        return [(n.name, n.op_type) for n in onnx.load(str(self.pre), load_external_data=False).graph.node]

    def layer_groups(self) -> dict[str, list[str]]:
        """Per ranked node (Conv/Gemm/MatMul): itself plus the non-ranked nodes feeding it since the previous
        ranked node (activations, pooling, reshapes). Keeping a layer in float in a QDQ graph means keeping
        its *input* activation unquantized, and that tensor's Q/DQ pair is inserted on behalf of those
        producers (Relu, Clip, pooling are quantizable ops too), so they must be excluded with it.
        """
        import onnx

        graph = onnx.load(str(self.pre), load_external_data=False).graph
        producer = {out: n for n in graph.node for out in n.output}
        groups: dict[str, list[str]] = {}
        for node in graph.node:
            if node.op_type not in RANKED_OPS:
                continue
            group, stack, seen = [node.name], [i for i in node.input if i in producer], set()
            while stack:
                p = producer[stack.pop()]
                if p.name in seen or p.op_type in RANKED_OPS:
                    continue
                seen.add(p.name)
                group.append(p.name)
                stack.extend(i for i in p.input if i in producer)
            groups[node.name] = group
        return groups

    def quantize(self, exclude: list[str], dst: Path) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from .stages.quantize_onnx import calibration_reader, quant_extra_options

        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_static(str(self.pre), str(dst), calibration_reader(self._calibration, self.input_name),
                        quant_format=QuantFormat.QDQ,
                        per_channel=self.kw["per_channel"], activation_type=types[self.kw["activation_type"]],
                        weight_type=types[self.kw["weight_type"]], reduce_range=self.kw["reduce_range"],
                        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[self.kw["method"]],
                        nodes_to_exclude=list(exclude), calibration_cache_path=str(self.cache),
                        op_types_to_quantize=self.kw["op_types"],
                        extra_options=quant_extra_options(self.kw["method"], 99.999))
        return dst


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def guard_quantization(fp32: Path, workdir: Path, calibration: Iterable[np.ndarray], x: np.ndarray,
                       labels: np.ndarray | None, *, max_drop: float = 1.0, rank_always: bool = True,
                       max_kept: int | None = None, batch_size: int = 64, log=print, quant_kw: dict | None = None,
                       latency_batch: int = 32, latency_runs: int = 10) -> dict:
    """Quantize ``fp32`` within ``max_drop`` top-1 points on (x, labels); returns facts incl. ``path``.

    Args:
        labels: ground truth for ``x``; None = judge against the FP32 model's own predictions.
    """
    from .measure import time_variants

    workdir = Path(workdir)
    t0 = time.perf_counter()
    rq = Requantizer(fp32, workdir / "guard", calibration, **(quant_kw or {}))
    ref = run_onnx(fp32, x, batch_size)
    if labels is None:
        labels = ref.argmax(1)
    fp32_top1 = _top1(ref, labels)

    def score(path: Path) -> dict:
        out = run_onnx(path, x, batch_size)
        return {"top1": _top1(out, labels), "mse": float(np.mean((out - ref) ** 2)),
                "agreement": float((out.argmax(1) == ref.argmax(1)).mean() * 100)}

    all_q = score(rq.dir / "guard.all.onnx")
    drop_all = fp32_top1 - all_q["top1"]
    nodes = rq.nodes()
    groups = rq.layer_groups()
    ranked_nodes = list(groups)
    sensitivity: list[dict] = []
    need = drop_all > max_drop
    if need or rank_always:
        trial = rq.dir / "guard.trial.onnx"
        for name in ranked_nodes:
            s = score(rq.quantize(groups[name], trial))
            sensitivity.append({"node": name, "op": dict(nodes)[name], "with": groups[name][1:],
                                "top1_if_float": round(s["top1"], 3),
                                "top1_gain": round(s["top1"] - all_q["top1"], 3),
                                "error_removed": round((all_q["mse"] - s["mse"]) / max(all_q["mse"], 1e-12), 4)})
        sensitivity.sort(key=lambda r: (-r["error_removed"], -r["top1_gain"]))
    kept: list[str] = []
    best = {"path": rq.dir / "guard.all.onnx", "kept": [], **all_q}
    steps = [{"kept": 0, "top1": round(all_q["top1"], 3), "drop": round(drop_all, 3)}]
    if need:
        order = [r["node"] for r in sensitivity]
        limit = len(order) if max_kept is None else min(max_kept, len(order))
        for i in range(limit):
            kept.append(order[i])
            path = rq.quantize([n for k in kept for n in groups[k]], rq.dir / f"guard.k{len(kept)}.onnx")
            s = score(path)
            steps.append({"kept": len(kept), "top1": round(s["top1"], 3), "drop": round(fp32_top1 - s["top1"], 3)})
            log(f"accuracy_guard: {len(kept)} node(s) in float -> drop {fp32_top1 - s['top1']:.2f} points")
            if s["top1"] > best["top1"] or (s["top1"] == best["top1"] and s["mse"] < best["mse"]):
                best = {"path": path, "kept": list(kept), **s}
            if fp32_top1 - s["top1"] <= max_drop:
                break
        if fp32_top1 - best["top1"] > max_drop and max_kept is None:
            # every ranked node in float and still over budget: the remaining quantized ops (Add, pooling...)
            everything = [n for n, _ in nodes]
            path = rq.quantize(everything, rq.dir / "guard.none.onnx")
            s = score(path)
            steps.append({"kept": "all", "top1": round(s["top1"], 3), "drop": round(fp32_top1 - s["top1"], 3)})
            if s["top1"] > best["top1"]:
                best = {"path": path, "kept": everything, **s}
    final = workdir / GUARDED_FILE
    Path(best["path"]).replace(final)
    drop = fp32_top1 - best["top1"]
    facts = {
        "max_drop": max_drop, "images": int(len(x)), "fp32_top1": round(fp32_top1, 3),
        "int8_all_top1": round(all_q["top1"], 3), "int8_all_drop": round(drop_all, 3),
        "top1": round(best["top1"], 3), "drop": round(drop, 3), "met": bool(drop <= max_drop + 1e-9),
        "kept_float": best["kept"], "steps": steps, "sensitivity": sensitivity, "path": str(final),
        "ranked_nodes": len(ranked_nodes),
    }
    if best["kept"]:
        xb = np.resize(x, (latency_batch, *x.shape[1:])).astype(np.float32)
        sessions = {"fp32": _session(fp32), "int8_all": _session(rq.dir / "guard.all.onnx"), "guarded": _session(final)}
        name = sessions["fp32"].get_inputs()[0].name
        run = time_variants({k: (lambda a, s=s: s.run(None, {name: a})) for k, s in sessions.items()}, xb,
                            max_rounds=max(2, latency_runs // 2), time_budget_s=20, eliminate=False)
        facts["latency_ms"] = run.p50()
        facts["latency_batch"] = latency_batch
        facts["latency_cost_vs_int8"] = round(run.records["guarded"].p50 / run.records["int8_all"].p50, 3)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    for p in rq.dir.glob("guard.*.onnx"):
        p.unlink(missing_ok=True)
    return facts


def sensitivity_markdown(facts: dict, top: int = 15) -> str:
    """The report section: budget outcome, kept layers, latency cost, and the top of the sensitivity table."""
    lines = [f"### Accuracy guard (budget {facts['max_drop']} top-1 points, {facts['images']} held-out train images)",
             "",
             f"FP32 {facts['fp32_top1']:.2f}% · INT8 all layers {facts['int8_all_top1']:.2f}% "
             f"(drop {facts['int8_all_drop']:.2f}) · final {facts['top1']:.2f}% (drop {facts['drop']:.2f}): "
             + ("**within budget**" if facts["met"] else "**budget NOT met**; wrote the best model found"), ""]
    if facts["kept_float"]:
        lines.append(f"Kept in float: {', '.join(f'`{n}`' for n in facts['kept_float'][:20])}"
                     + (" ..." if len(facts["kept_float"]) > 20 else ""))
        if "latency_ms" in facts:
            lat = facts["latency_ms"]
            lines.append(f"Latency at batch {facts['latency_batch']}: FP32 {lat['fp32']:.2f} ms, INT8 "
                         f"{lat['int8_all']:.2f} ms, guarded {lat['guarded']:.2f} ms "
                         f"({facts['latency_cost_vs_int8']:.2f}x of full INT8)")
        lines.append("")
    if facts["sensitivity"]:
        lines += ["| node | op | top-1 if kept float | top-1 gain | INT8 error removed |", "|---|---|---:|---:|---:|"]
        for r in facts["sensitivity"][:top]:
            lines.append(f"| `{r['node']}` | {r['op']} | {r['top1_if_float']:.2f} | {r['top1_gain']:+.2f} | "
                         f"{r['error_removed'] * 100:.1f}% |")
        if len(facts["sensitivity"]) > top:
            lines.append(f"\n({len(facts['sensitivity']) - top} less sensitive nodes omitted; all are in report.json)")
    return "\n".join(lines) + "\n"
