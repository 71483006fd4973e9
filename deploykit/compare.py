"""Original vs compressed, measured the same way: accuracy, per-class F1, fidelity, latency, size.

``compare_models`` runs after the stages: it evaluates the original (PyTorch), the FP32 ONNX and the shipped
model on the evaluation split with the backends they are served with, and times them in alternating blocks.

Example:
    >>> report = compare_models(state, recipe, artifact_dir / "model.onnx", console, notes)
    >>> report["models"]["compressed"]["macro_f1"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _size_mb(obj) -> float:
    if isinstance(obj, Path):  # an OpenVINO IR is its .xml plus the .bin of weights
        files = [obj, obj.with_suffix(".bin")] if obj.suffix == ".xml" else [obj]
        return round(sum(f.stat().st_size for f in files) / 2**20, 3)
    return round(sum(t.numel() * t.element_size() for t in obj.state_dict().values()) / 2**20, 3)


def compare_models(state, recipe, final: Path, console, notes: list[str]) -> dict:
    """The report's models, fidelity, latency and per-class sections (the caller adds run metadata)."""
    from .backends import create_backend
    from .environment import machine_line
    from .evaluate import classification_metrics, fidelity, predict
    from .timing import measure_in_blocks

    ev, pre = recipe.eval, state.preprocessing
    variants = {"original": (create_backend("torch", state.teacher, threads=ev.threads), state.teacher)}
    if state.onnx_fp32_path is not None and state.onnx_fp32_path.exists() and state.precision != "fp32":
        variants["onnx_fp32"] = (create_backend("onnxruntime", state.onnx_fp32_path, threads=ev.threads),
                                 state.onnx_fp32_path)
    settings = {k: v for k, v in state.runtime.settings.items() if k != "precision"}
    variants["compressed"] = (create_backend(state.runtime.backend, final, threads=ev.threads,
                                             precision=state.precision, **settings), final)

    models: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    for key, (backend, obj) in variants.items():
        models[key] = {"backend": backend.name, "precision": backend.precision, "size_mb": _size_mb(obj),
                       "runtime": backend.info()}
        if state.data is not None:
            with console.status(f"evaluating {key} on {len(state.data.eval)} images..."):
                logits[key] = predict(backend, state.data.eval, pre, recipe.data.batch_size)
            models[key].update(classification_metrics(logits[key], state.data.eval.labels, len(pre.class_names)))
        else:
            logits[key] = backend.run(state.check_inputs())
            models[key].update({"top1": None, "top5": None, "macro_f1": None, "per_class_f1": None})

    fid = fidelity(logits["original"], logits["compressed"])
    fid["inputs"] = int(len(logits["original"]))
    fid["inputs_kind"] = "evaluation images" if state.data is not None else "held-out synthetic inputs"

    sample = state.check_inputs()
    for bs in ev.latency_batch_sizes:
        x = np.resize(sample, (bs, *sample.shape[1:])).astype(np.float32)
        with console.status(f"timing batch {bs}..."):
            for b, _ in variants.values():  # first-call allocations and graph compilation stay out of the numbers
                for _ in range(ev.warmup_runs):
                    b.run(x)
            # PyTorch's OpenMP workers spin after each call and slow whichever runtime runs next on 2 cores
            # (measured: ORT INT8 bs32 5.3 ms right after torch blocks vs 2.4 ms without), so the exported
            # runtimes are interleaved with each other and torch is timed on its own afterwards.
            groups = [[k for k in variants if variants[k][0].name != "torch"],
                      [k for k in variants if variants[k][0].name == "torch"]]
            stats = {}
            for group in filter(None, groups):
                stats.update(measure_in_blocks({k: variants[k][0].run for k in group}, x,
                                               rounds=max(2, ev.latency_runs // 5), block_runs=5,
                                               time_budget_s=ev.latency_budget_s))
        for key, s in stats.items():
            lat = models[key].setdefault("latency_ms", {})
            lat.update({f"bs{bs}_p50": s.p50, f"bs{bs}_p90": s.p90, f"bs{bs}_p99": s.p99})
            models[key].setdefault("throughput_ips", {})[f"bs{bs}"] = round(s.throughput, 1)
            models[key].setdefault("latency_runs", {})[f"bs{bs}"] = s.runs

    report: dict[str, Any] = {"models": models, "fidelity": fid, "latency_batch_sizes": ev.latency_batch_sizes,
                              "environment": {"machine": machine_line(), "threads": variants["original"][0].threads}}
    _speed_notes(models, ev.latency_batch_sizes, state.precision, notes)
    if state.data is not None:
        from .forgetting import forgetting_report

        report["per_class"] = _per_class(models, pre.class_names)
        report["forgetting"] = forgetting_report(state.data.eval.labels, logits["original"], logits["compressed"],
                                                 pre.class_names)
        drop = models["original"]["top1"] - models["compressed"]["top1"]
        notes.append(f"top-1 {models['original']['top1']:.2f}% -> {models['compressed']['top1']:.2f}% "
                     f"({-drop:+.2f} points) on {len(state.data.eval)} evaluation images")
    return report


def _speed_notes(models: dict, batch_sizes: list[int], precision: str, notes: list[str]) -> None:
    """Say plainly when compression did not pay on this machine."""
    ref_key = "onnx_fp32" if "onnx_fp32" in models else "original"
    for bs in batch_sizes:
        c = models["compressed"]["latency_ms"][f"bs{bs}_p50"]
        for key in dict.fromkeys(("original", ref_key)):
            r = models[key]["latency_ms"][f"bs{bs}_p50"]
            speedup = r / c if c > 0 else float("inf")
            models["compressed"].setdefault("speedup", {})[f"vs_{key}_bs{bs}"] = round(speedup, 3)
        r = models[ref_key]["latency_ms"][f"bs{bs}_p50"]
        if precision != "fp32" and c >= 0.95 * r:
            notes.append(f"{precision.upper()} is NOT faster than its FP32 counterpart ({ref_key}) at batch {bs} "
                         f"on this machine: {c:.2f} ms vs {r:.2f} ms. Consider another runtime or precision.")


def _per_class(models: dict, class_names: list[str]) -> list[dict]:
    o, c = models["original"], models["compressed"]
    rows = [{"class": name, "support": o["support"][i], "f1_original": o["per_class_f1"][i],
             "f1_compressed": c["per_class_f1"][i], "f1_change": round(c["per_class_f1"][i] - o["per_class_f1"][i], 3),
             "recall_original": o["per_class_recall"][i], "recall_compressed": c["per_class_recall"][i]}
            for i, name in enumerate(class_names)]
    return sorted(rows, key=lambda r: r["f1_change"])
