"""Original vs compressed, measured the same way: accuracy, per-class F1, fidelity, latency, size.

``compare_models`` runs after the stages. It shows the original (PyTorch), the FP32 ONNX and the shipped model
with the numbers select_runtime measured for them (``state.measured``: the same loaded models, the same logits,
the same timing records), and measures only what is missing, with the same harness (``deploykit.measure``). When
no stage changed the weights, the original's accuracy is its FP32 export's (the same weights, parity-checked at
export), evaluated once.

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
    from .evaluate import classification_metrics, fidelity
    from .measure import array_batches, logits_for, time_batch_sizes
    from .stages.select_runtime import TORCH
    from .variants import REFERENCE

    ev, pre = recipe.eval, state.preprocessing
    measured = state.measured
    cached = measured.backends if measured is not None else {}
    # report key -> (name in the measurements, how to load it if select_runtime did not, what its size is);
    # files load through the run's cache (state.backend), so a session a stage already opened is reused
    keys = {"original": (TORCH, lambda: create_backend("torch", state.teacher, threads=ev.threads), state.teacher)}
    if state.onnx_fp32_path is not None and state.onnx_fp32_path.exists() and state.precision != "fp32":
        keys["onnx_fp32"] = (REFERENCE, lambda: state.backend("onnxruntime", state.onnx_fp32_path,
                                                              threads=ev.threads), state.onnx_fp32_path)
    settings = {k: v for k, v in state.runtime.settings.items() if k != "precision"}
    keys["compressed"] = (state.runtime.variant or "shipped", lambda: state.backend(
        state.runtime.backend, final, threads=ev.threads, precision=state.precision, **settings), final)
    routes = state.runtime.by_batch
    if routes:  # one runtime per batch size: each batch size is the variant routed to it (Artifact.backend())
        from dataclasses import asdict

        from .backends.batch_router import BatchRouter, nearest_batch

        def route(bs: int) -> str:
            return routes[nearest_batch(routes, bs)].variant

        keys["compressed"] = (route(recipe.data.batch_size), lambda: BatchRouter.from_routes(
            {bs: asdict(r) for bs, r in routes.items()},
            lambda r, s: cached.get(r["variant"]) or state.backend(r["backend"], state.workdir / r["model"],
                                                                   threads=ev.threads, precision=r["precision"], **s)),
            final)
    names = {key: name for key, (name, _, _) in keys.items()}

    def timed_name(key: str, bs: int) -> str:
        return route(bs) if routes and key == "compressed" else names[key]

    backends = {key: cached[name] if name in cached and not (routes and key == "compressed") else make()
                for key, (name, make, _) in keys.items()}  # a router is built over the cached sessions

    # Accuracy: one pass over shared batches for whatever select_runtime did not already evaluate on these inputs.
    data = state.data
    inputs = data.eval if data is not None else state.check_inputs()
    known = dict(measured.logits) if measured is not None and _same_inputs(measured, data, inputs) else {}
    if not state.weights_changed and REFERENCE in known and names["original"] not in known:
        known[names["original"]] = known[REFERENCE]  # fused + exported = the original's function (parity-checked)
        notes.append("the original's accuracy is that of its FP32 ONNX export: the same weights, parity-checked "
                     "at export, evaluated once")
    todo = {key: backends[key] for key in keys if names[key] not in known}
    if todo:
        with console.status(f"evaluating {', '.join(todo)} on {len(inputs)} inputs..."):
            batches = ((x for x, _ in inputs.batches(pre, recipe.data.batch_size)) if data is not None
                       else array_batches(inputs, 64))
            for key, lg in logits_for(todo, batches).items():
                known[names[key]] = lg
    logits = {key: known[names[key]] for key in keys}

    models: dict[str, dict] = {}
    for key, (_, _, obj) in keys.items():
        models[key] = {"backend": backends[key].name, "precision": backends[key].precision, "size_mb": _size_mb(obj),
                       "runtime": backends[key].info()}
        if data is not None:
            models[key].update(classification_metrics(logits[key], data.eval.labels, len(pre.class_names)))
        else:
            models[key].update({"top1": None, "top5": None, "macro_f1": None, "per_class_f1": None})

    fid = fidelity(logits["original"], logits["compressed"])
    fid["inputs"] = int(len(logits["original"]))
    fid["inputs_kind"] = "evaluation images" if data is not None else "held-out synthetic inputs"

    # Latency: select_runtime's records where it timed these variants at these batch sizes; the rest timed here.
    records: dict[str, dict[int, object]] = {key: {} for key in keys}
    runs: dict[int, dict[str, tuple]] = {}  # bs -> key -> (the timing run that timed it, its name in that run)
    missing: dict[int, list[str]] = {}
    for bs in ev.latency_batch_sizes:
        run = measured.timings.get(bs) if measured is not None else None
        for key in keys:
            if run is not None and timed_name(key, bs) in run.records:
                records[key][bs] = run.records[timed_name(key, bs)]
                runs.setdefault(bs, {})[key] = (run, timed_name(key, bs))
            else:
                missing.setdefault(bs, []).append(key)
    for bs, todo_keys in missing.items():
        with console.status(f"timing {', '.join(todo_keys)} at batch {bs}..."):
            run = time_batch_sizes({k: backends[k].run for k in todo_keys}, state.check_inputs(), [bs],
                                   max_rounds=max(2, ev.latency_runs // 5), warmup=ev.warmup_runs,
                                   time_budget_s=ev.latency_budget_s, eliminate=False)[bs]
        for key in todo_keys:
            records[key][bs] = run.records[key]
            runs.setdefault(bs, {})[key] = (run, key)
    for key, by_bs in records.items():
        for bs, rec in sorted(by_bs.items()):
            m = models[key]
            m.setdefault("latency_ms", {}).update({f"bs{bs}_p50": rec.p50, f"bs{bs}_p90": rec.p90,
                                                   f"bs{bs}_p99": rec.p99})
            m.setdefault("throughput_ips", {})[f"bs{bs}"] = round(rec.throughput, 1)
            m.setdefault("latency_runs", {})[f"bs{bs}"] = rec.runs
            m.setdefault("timing", {})[f"bs{bs}"] = rec.to_dict()

    report: dict[str, Any] = {"models": models, "fidelity": fid, "latency_batch_sizes": ev.latency_batch_sizes,
                              "environment": {"machine": machine_line(), "threads": backends["original"].threads}}
    _speed_notes(models, ev.latency_batch_sizes, state.precision, notes, runs)
    if data is not None:
        from .forgetting import forgetting_report

        report["per_class"] = _per_class(models, pre.class_names)
        report["forgetting"] = forgetting_report(data.eval.labels, logits["original"], logits["compressed"],
                                                 pre.class_names)
        drop = models["original"]["top1"] - models["compressed"]["top1"]
        notes.append(f"top-1 {models['original']['top1']:.2f}% -> {models['compressed']['top1']:.2f}% "
                     f"({-drop:+.2f} points) on {len(data.eval)} evaluation images")
    return report


def _same_inputs(measured, data, inputs) -> bool:
    """Were select_runtime's logits computed on exactly the inputs the report evaluates on?"""
    ref = next(iter(measured.logits.values()), None)
    if ref is None or len(ref) != len(inputs):
        return False
    if data is None:
        return measured.labels is None
    return measured.labels is not None and np.array_equal(measured.labels, data.eval.labels)


def latency_ratio(runs: dict[int, dict[str, tuple]], bs: int, a: str, b: str) -> float:
    """``a``'s latency / ``b``'s at batch ``bs``: paired by round when one timing run timed both
    (``measure.Ratio``), else the ratio of their medians."""
    (run_a, name_a), (run_b, name_b) = runs[bs][a], runs[bs][b]
    if run_a is run_b:
        return run_a.ratio(name_a, name_b).value
    return run_a.records[name_a].p50 / run_b.records[name_b].p50


def _speed_notes(models: dict, batch_sizes: list[int], precision: str, notes: list[str],
                 runs: dict[int, dict[str, tuple]]) -> None:
    """Speedups of the compressed model, and say plainly when compression did not pay on this machine."""
    ref_key = "onnx_fp32" if "onnx_fp32" in models else "original"
    for bs in batch_sizes:
        c = models["compressed"]["latency_ms"][f"bs{bs}_p50"]
        for key in dict.fromkeys(("original", ref_key)):
            speedup = latency_ratio(runs, bs, key, "compressed")
            models["compressed"].setdefault("speedup", {})[f"vs_{key}_bs{bs}"] = round(speedup, 3)
        r = models[ref_key]["latency_ms"][f"bs{bs}_p50"]
        if precision != "fp32" and latency_ratio(runs, bs, "compressed", ref_key) >= 0.95:
            notes.append(f"{precision.upper()} is NOT faster than its FP32 counterpart ({ref_key}) at batch {bs} "
                         f"on this machine: {c:.2f} ms vs {r:.2f} ms. Consider another runtime or precision.")


def _per_class(models: dict, class_names: list[str]) -> list[dict]:
    o, c = models["original"], models["compressed"]
    rows = [{"class": name, "support": o["support"][i], "f1_original": o["per_class_f1"][i],
             "f1_compressed": c["per_class_f1"][i], "f1_change": round(c["per_class_f1"][i] - o["per_class_f1"][i], 3),
             "recall_original": o["per_class_recall"][i], "recall_compressed": c["per_class_recall"][i]}
            for i, name in enumerate(class_names)]
    return sorted(rows, key=lambda r: r["f1_change"])
