"""The one entry point: ``compress(checkpoint, recipe) -> CompressResult``.

The CLI, the tests and the benchmarks all call this. It loads the checkpoint, resolves data and
preprocessing, runs the recipe's stages in order inside an atomically-written artifact directory,
evaluates original vs compressed, and writes recipe.yaml, preprocessing.json, report.json/.md and
manifest.json.

Example:
    >>> res = compress("models/resnet10t_fmnist.pth", "int8-ptq", data="fashion-mnist")
    >>> res.report["fidelity"]["top1_agreement"]
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import (FINAL_MODEL, MANIFEST, PREPROCESSING, RECIPE_YAML, REPORT_JSON, REPORT_MD,
                       ArtifactWriter, sha256_file, write_json)
from .recipe import Recipe, load_recipe
from .report import REPORT_SCHEMA, render_markdown


@dataclass
class CompressResult:
    path: Path
    report: dict
    manifest: dict


def default_output(checkpoint: str | Path) -> Path:
    return Path(f"{Path(checkpoint).stem}.deploykit")


def _console(console):
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    return console


def compress(checkpoint: str | Path, recipe: Recipe | str | Path = "int8-ptq", *, out: str | Path | None = None,
             overwrite: bool = False, console=None, **overrides: Any) -> CompressResult:
    """Run ``recipe`` on ``checkpoint``; keyword overrides are dotted recipe keys with '.' spelled '__'.

    Example: ``compress(ckpt, "int8-ptq", data__name="fashion-mnist", stages__quantize_onnx__method="entropy")``
    """
    import torch

    from .checkpoint import load_checkpoint, resolve_preprocessing
    from .data import BUILTIN, check_fits, resolve_data
    from .stages import STAGES, PipelineState

    console = _console(console)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if overrides:
        recipe = recipe.with_overrides({k.replace("__", "."): v for k, v in overrides.items()})
    threads = recipe.eval.threads
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()

    mc = recipe.model
    loaded = load_checkpoint(checkpoint, arch=mc.arch, num_classes=mc.num_classes, in_chans=mc.in_chans,
                             trust_pickle=mc.trust_pickle)
    for note in loaded.notes:
        console.print(f"[dim]checkpoint:[/] {note}")
    recorded = loaded.hints.get("dataset")
    if recipe.data.name is None and recorded in BUILTIN:
        console.print(f"[dim]data:[/] using {recorded!r}, the dataset recorded in the checkpoint "
                      "(--data none for data-free)")
        recipe = recipe.with_overrides({"data.name": recorded})
    data = resolve_data(recipe.data)
    if data is not None:
        check_fits(data, loaded.num_classes)
        if not mc.class_names and not loaded.class_names:
            mc = mc.model_copy(update={"class_names": data.class_names})
    pre = resolve_preprocessing(loaded, mc)
    console.print(f"[bold]{loaded.arch}[/] ({loaded.weights}), {loaded.num_classes} classes, input "
                  f"{'x'.join(map(str, pre.input_size))}, data: {data.name if data else 'none (data-free)'}")

    out = Path(out) if out else default_output(checkpoint)
    notes: list[str] = []
    with ArtifactWriter(out, overwrite=overwrite) as workdir:
        teacher = loaded.model.eval()
        state = PipelineState(model=copy.deepcopy(teacher), teacher=teacher, preprocessing=pre, workdir=workdir,
                              data=data, target=recipe.target, log=console.print)
        _attach_inputs(state, recipe, console, notes)

        lineage = []
        for spec in recipe.stages:
            stage = STAGES.get(spec.name)(spec.config)
            with console.status(f"stage {spec.name}..."):
                t0 = time.perf_counter()
                facts = stage.run(state)
                seconds = time.perf_counter() - t0
            console.print(f"[green]done[/] {spec.name} in {seconds:.1f}s")
            state.facts[spec.name] = facts
            lineage.append({"name": spec.name, "config": spec.config.model_dump(mode="json"),
                            "seconds": round(seconds, 3), "facts": facts})

        final = _finalize_model(state)
        pre.save(workdir / PREPROCESSING)
        (workdir / RECIPE_YAML).write_text(recipe.to_yaml())
        report = _evaluate(state, recipe, final, console, notes) if recipe.eval.enabled else {"models": {}}
        report.update({
            "schema": REPORT_SCHEMA,
            "checkpoint": Path(checkpoint).name,
            "recipe": recipe.name,
            "target": recipe.target,
            "data": {"name": data.name if data else None, "real": data is not None,
                     "calibration_images": int(len(state.calibration_inputs())) if "calibration" in state._cache else 0,
                     "eval_images": int(len(data.eval)) if data else 0},
            "stages": [{"name": s["name"], "seconds": s["seconds"]} for s in lineage],
            "stage_facts": {s["name"]: s["facts"] for s in lineage},
            "notes": notes,
            "total_seconds": round(time.perf_counter() - t_start, 2),
        })
        write_json(workdir / REPORT_JSON, report)
        (workdir / REPORT_MD).write_text(render_markdown(report))
        manifest = _manifest(checkpoint, loaded, state, final, lineage, workdir)
        write_json(workdir / MANIFEST, manifest)
    console.print(f"[bold green]wrote[/] {out}/ in {report['total_seconds']:.1f}s")
    return CompressResult(path=out, report=report, manifest=manifest)


def _attach_inputs(state, recipe: Recipe, console, notes: list[str]) -> None:
    """Calibration and parity-check inputs, built only when a stage first asks for them."""
    d, pre = recipe.data, state.preprocessing
    if state.data is not None:
        data = state.data
        state.calibration_fn = lambda: data.calibration.load(pre, np.arange(len(data.calibration)))
        check = data.eval.head(d.check_images, seed=d.seed + 1)
        state.check_fn = lambda: check.load(pre, np.arange(len(check)))
        return
    from .data.synthetic import synthesize_from_bn

    notes.append("No --data given: calibrated on inputs synthesized from the model's BatchNorm statistics "
                 "(data-free, ZeroQ-style). Accuracy was NOT measured; fidelity is measured on held-out "
                 "synthetic inputs. Pass --data for real numbers.")
    console.print(f"[yellow]warning:[/] {notes[-1]}")

    n_cal, n_check = d.synthetic_images, min(16, d.check_images)

    def synth() -> np.ndarray:
        # One optimisation for both sets (the cost is per step, not per image); split afterwards so the
        # parity checks run on inputs the calibration never saw.
        if "synthetic" not in state._cache:
            with console.status(f"synthesizing {n_cal + n_check} data-free inputs from BatchNorm statistics..."):
                state._cache["synthetic"] = synthesize_from_bn(state.teacher, pre.input_size, n=n_cal + n_check,
                                                               steps=d.synthetic_steps, seed=d.seed)
        return state._cache["synthetic"]

    state.calibration_fn = lambda: synth()[:n_cal]
    state.check_fn = lambda: synth()[n_cal:]


def _finalize_model(state) -> Path:
    """The file the default runtime runs, plus ``model.onnx``: always the final model in ONNX form.

    A stage that picks the runtime by measurement (select_runtime) names its file in ``state.runtime["model"]``
    (e.g. an OpenVINO IR ``model.ov.xml``); otherwise the latest ONNX ships. ``model.onnx`` is a hard link to the
    chosen ONNX (or, for an IR, to the latest ONNX of the same precision), so ONNX consumers always find it and
    the per-variant files named in the manifest stay where they are.
    """
    if state.onnx_path is None:
        raise RuntimeError("recipe produced no ONNX model: it needs an export_onnx stage")
    chosen = state.runtime.get("model")
    if chosen:
        missing = [f for f in state.runtime.get("model_files", [chosen]) if not (state.workdir / f).is_file()]
        if missing:
            raise RuntimeError(f"runtime model files {missing} were not written by the recipe's stages")
    onnx_final = state.workdir / FINAL_MODEL
    source = state.workdir / chosen if chosen and chosen.endswith(".onnx") else state.onnx_path
    if source != onnx_final:
        try:
            os.link(source, onnx_final)
        except OSError:
            import shutil

            shutil.copyfile(source, onnx_final)
    state.onnx_path = onnx_final
    return state.workdir / chosen if chosen and not chosen.endswith(".onnx") else onnx_final


def _size_mb(obj) -> float:
    if isinstance(obj, Path):  # an OpenVINO IR is its .xml plus the .bin of weights
        files = [obj, obj.with_suffix(".bin")] if obj.suffix == ".xml" else [obj]
        return round(sum(f.stat().st_size for f in files) / 2**20, 3)
    return round(sum(t.numel() * t.element_size() for t in obj.state_dict().values()) / 2**20, 3)


def _evaluate(state, recipe: Recipe, final: Path, console, notes: list[str]) -> dict:
    from .backends import create_backend
    from .environment import machine_line
    from .evaluate import classification_metrics, fidelity, predict
    from .timing import measure_in_blocks

    ev, pre = recipe.eval, state.preprocessing
    variants = {"original": (create_backend("torch", state.teacher, threads=ev.threads), state.teacher)}
    if state.onnx_fp32_path is not None and state.onnx_fp32_path.exists() and state.precision != "fp32":
        variants["onnx_fp32"] = (create_backend("onnxruntime", state.onnx_fp32_path, threads=ev.threads),
                                 state.onnx_fp32_path)
    settings = {k: v for k, v in state.runtime.get("settings", {}).items() if k != "precision"}
    variants["compressed"] = (create_backend(state.runtime["backend"], final, threads=ev.threads,
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


def _manifest(checkpoint, loaded, state, final: Path, lineage: list, workdir: Path) -> dict:
    from . import __version__
    from .environment import machine, versions

    files = {p.name: sha256_file(p) for p in sorted(workdir.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "schema": 1,
        "deploykit": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint), "sha256": loaded.sha256, "arch": loaded.arch,
                   "weights": loaded.weights, "num_classes": loaded.num_classes},
        "runtime": {"backend": state.runtime["backend"], "model": final.name, "precision": state.precision,
                    "settings": state.runtime.get("settings", {}), "target": state.target,
                    # per-backend model files (Artifact.backend(name) / DEPLOYKIT_BACKEND) and the chosen variant
                    **{k: state.runtime[k] for k in ("files", "variant") if k in state.runtime}},
        "files": files,
        "lineage": [{k: s[k] for k in ("name", "config", "seconds")} for s in lineage],
        "versions": versions(),
        "machine": machine(),
    }
