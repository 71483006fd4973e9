"""The one entry point: ``compress(checkpoint, recipe) -> CompressResult``.

The CLI, the tests and the benchmarks all call this. It only orchestrates: load the checkpoint
(``checkpoint``), resolve data (``data``) and preprocessing (``preprocessing``), run the recipe's stages in
order inside an atomically-written artifact directory (``stages``, ``artifact``), compare original vs
compressed (``compare``), and write recipe.yaml, preprocessing.json, report.json/.md and manifest.json.

Example:
    >>> res = compress("models/resnet10t_fmnist.pth", "int8-ptq", data="fashion-mnist")
    >>> res.report["fidelity"]["top1_agreement"]
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifact import (MANIFEST, PREPROCESSING, RECIPE_YAML, REPORT_JSON, REPORT_MD, TTA_POLICY, ArtifactWriter,
                       build_manifest, finalize_model, write_json)
from .back_off import next_back_off
from .recipe import Recipe, load_recipe
from .report import REPORT_SCHEMA, render_markdown
from .stages.select_runtime import ChainBudgetMissed


@dataclass
class CompressResult:
    path: Path
    report: dict
    manifest: dict


def default_output(checkpoint: str | Path) -> Path:
    """``ckpt.pth`` -> ``ckpt.deploykit``; timm's ``model_best.pth.tar`` -> ``model_best.deploykit``;
    a factory ``nets.py:make`` -> ``make.deploykit``."""
    name = Path(str(checkpoint).rsplit(":", 1)[-1]).name
    for suffix in (".pth.tar", ".pt.tar", ".pth", ".pt", ".tar", ".bin", ".ckpt", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return Path(f"{name}.deploykit")


def _console(console):
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    return console


def compress(checkpoint: str | Path | None = None, recipe: Recipe | str | Path = "int8-ptq", *, model=None,
             out: str | Path | None = None, overwrite: bool = False, console=None,
             **overrides: Any) -> CompressResult:
    """Run ``recipe`` on ``checkpoint``; keyword overrides are dotted recipe keys with '.' spelled '__'.

    Args:
        checkpoint: a timm/plain/Lightning/SWA ``.pth`` or ``.safetensors`` file; None with ``model`` (its own
            weights) or with ``model__factory`` (the factory's weights).
        model: your own ``nn.Module``; the checkpoint's weights, if given, are loaded into it.

    Example: ``compress(ckpt, "int8-ptq", data__name="fashion-mnist", stages__quantize_onnx__method="entropy")``
    """
    import torch

    from .checkpoint import load_model
    from .compare import compare_models
    from .data import check_fits, registered_name, resolve_data
    from .inputs import stage_inputs
    from .preprocessing import resolve_preprocessing
    from .sanity import ema_vs_model
    from .measure import stopwatch
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
    loaded = load_model(checkpoint, mc, model)
    for note in loaded.notes:
        console.print(f"[dim]checkpoint:[/] {note}")
    stages = [STAGES.get(spec.name)(spec.config) for spec in recipe.stages]
    for stage in stages:  # refuse what a stage cannot do before any data is read or any stage runs
        stage.preflight(loaded.model)
    recorded = registered_name(loaded.hints.get("dataset"))
    if recipe.data.name is None and recorded:
        console.print(f"[dim]data:[/] using {recorded!r}, the dataset recorded in the checkpoint "
                      "(--data none for data-free)")
        recipe = recipe.with_overrides({"data.name": recorded})
    data = resolve_data(recipe.data)
    if data is not None:
        check_fits(data, loaded.num_classes)
        for note in data.notes:
            console.print(f"[yellow]warning:[/] {note}")
        if not mc.class_names and not loaded.class_names:
            mc = mc.model_copy(update={"class_names": data.class_names})
    input_notes: list[str] = []
    pre = resolve_preprocessing(loaded, mc, input_notes)
    input_notes += [n for n in [ema_vs_model(loaded, data, pre)] if n]
    loaded.alternative = None  # the other weight set was only for that check: do not hold it through the stages
    for note in input_notes:
        console.print(f"[yellow]warning:[/] {note}")
    console.print(f"[bold]{loaded.arch}[/] ({loaded.weights}), {loaded.num_classes} classes, input "
                  f"{'x'.join(map(str, pre.input_size))}, data: {data.name if data else 'none (data-free)'}")

    out = Path(out) if out else default_output(checkpoint if checkpoint is not None else loaded.arch)
    notes: list[str] = list(input_notes) + (list(data.notes) if data is not None else [])
    with ArtifactWriter(out, overwrite=overwrite) as workdir:
        teacher = loaded.model.eval()
        inputs = stage_inputs(teacher, pre, data, recipe.data, console, notes)
        steps = []
        if data is None:  # data-free: synthesizing the inputs is a step of its own, with its own time
            with stopwatch() as sw:
                inputs.check()
            console.print(f"[green]done[/] synthesize_inputs in {sw['seconds']:.1f}s")
            steps.append({"name": "synthesize_inputs", "seconds": round(sw["seconds"], 3)})
        backed_off: list[dict] = []
        while True:
            state = PipelineState(model=copy.deepcopy(teacher), teacher=teacher, preprocessing=pre, workdir=workdir,
                                  data=data, target=recipe.target, log=console.print, inputs=inputs,
                                  model_kwargs=dict(loaded.model_kwargs or {}))
            lineage: list[dict] = []
            try:
                _run_stages(recipe, stages, state, console, lineage)
                break
            except ChainBudgetMissed as miss:
                step = next_back_off(recipe, _facts_by_stage(lineage).get("distill"), miss.near_miss)
                if step is None:
                    raise
                recipe = recipe.with_overrides(step.overrides)
                backed_off.append({"missed": miss.problem, "change": step.change})
                console.print(f"[yellow]accuracy budget missed ({miss.problem}); re-running the chain with "
                              f"{step.change}[/]")
                notes.append(f"the chain missed the accuracy budget against the original and re-ran with "
                             f"{step.change}: {miss.problem}")
                stages = [STAGES.get(spec.name)(spec.config) for spec in recipe.stages]

        final = finalize_model(state)
        pre.save(workdir / PREPROCESSING)
        if state.tta_policy is not None:
            write_json(workdir / TTA_POLICY, state.tta_policy.to_dict())
            if state.tta_policy.curves:
                from .plots import tta_curve_plot

                tta_curve_plot(state.tta_policy.to_dict(), workdir / "tta_policy.png")
        (workdir / RECIPE_YAML).write_text(recipe.to_yaml())
        report = compare_models(state, recipe, final, console, notes) if recipe.eval.enabled else {"models": {}}
        report.update({
            "schema": REPORT_SCHEMA,
            "checkpoint": Path(checkpoint).name if checkpoint is not None else None,
            "recipe": recipe.name,
            "target": recipe.target,
            "data": {"name": data.name if data else None, "real": data is not None,
                     "calibration_images": state.inputs.calibration_used,
                     "eval_images": int(len(data.eval)) if data else 0},
            "stages": steps + [{"name": s["name"], "seconds": s["seconds"]} for s in lineage],
            "stage_facts": {**({"synthesize_inputs": state.inputs.origin} if steps else {}),
                            **_facts_by_stage(lineage)},
            "backed_off": backed_off,
            "notes": notes,
            "total_seconds": round(time.perf_counter() - t_start, 2),
        })
        write_json(workdir / REPORT_JSON, report)
        (workdir / REPORT_MD).write_text(render_markdown(report))
        manifest = build_manifest(checkpoint, loaded, state, final, lineage, workdir)
        write_json(workdir / MANIFEST, manifest)
    console.print(f"[bold green]wrote[/] {out}/ in {report['total_seconds']:.1f}s")
    return CompressResult(path=out, report=report, manifest=manifest)


def _run_stages(recipe: Recipe, stages: list, state, console, lineage: list[dict]) -> None:
    """Run each stage on ``state`` in order, appending to ``lineage`` (name, config, seconds, facts per stage) as
    each finishes: a chain that stops part-way still shows what its stages found."""
    from .measure import stopwatch
    from .stop import check_stop

    for spec, stage in zip(recipe.stages, stages):
        check_stop()
        with console.status(f"stage {spec.name}..."), stopwatch() as sw:
            facts = stage.run(state)
        console.print(f"[green]done[/] {spec.name} in {sw['seconds']:.1f}s")
        lineage.append({"name": spec.name, "config": spec.config.model_dump(mode="json"),
                        "seconds": round(sw["seconds"], 3), "facts": facts})


def _facts_by_stage(lineage: list[dict]) -> dict[str, dict]:
    """Each stage's report facts by name; a stage a recipe lists twice reports its second run as ``name#2``."""
    out: dict[str, dict] = {}
    for step in lineage:
        key, n = step["name"], 1
        while key in out:
            n += 1
            key = f"{step['name']}#{n}"
        out[key] = step["facts"]
    return out
