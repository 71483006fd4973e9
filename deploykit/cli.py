"""The `deploykit` command. It only turns flags into a recipe and calls the library (deploykit.api).

Example:
    $ deploykit compress models/resnet10t_fmnist.pth --int8 --data fashion-mnist
    $ deploykit compress ckpt.pth --recipe recipes/int8-ptq.yaml --dry-run
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .data import describe_datasets
from .errors import DeployKitError, Terminated

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress, verify, benchmark and serve image classifiers.")


class Target(str, Enum):
    cpu = "cpu"
    tensorrt = "tensorrt"
    cuda = "cuda"
    gpu = "gpu"


class CalibMethod(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Balance(str, Enum):
    none = "none"
    sampler = "sampler"
    effective_number = "effective_number"


def fail(err: Exception, code: int = 2) -> None:
    """One line on stderr, non-zero exit: the contract for every user error."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


# (precision flag, target) -> built-in recipe. One checkpoint, one artifact per target: the TensorRT INT8 graph
# (symmetric Q/DQ placed for TensorRT's fusions) ran slower than FP32 on ONNX Runtime CPU, so targets never share.
PRESETS = {
    ("int8", "cpu"): "int8-ptq", ("fp16", "cpu"): "fp16", ("bf16", "cpu"): "bf16", ("fp32", "cpu"): "fp32",
    ("int8", "tensorrt"): "int8-tensorrt", ("fp16", "tensorrt"): "fp16-tensorrt",
    ("fp16", "cuda"): "fp16", ("fp32", "tensorrt"): "fp32", ("fp32", "cuda"): "fp32",
    ("fp16", "gpu"): "gpu-fp16", ("bf16", "gpu"): "gpu-bf16",
}
# the precision a target gets when no precision flag is given (the torch-cuda runtime runs floats only)
DEFAULT_PRECISION = {"gpu": "fp16"}


def preset_recipe(recipe: Optional[str], int8: bool, fp16: bool, bf16: bool, fp32: bool,
                  target: Optional[str] = None) -> str:
    chosen = [name for flag, name in ((int8, "int8"), (fp16, "fp16"), (bf16, "bf16"), (fp32, "fp32")) if flag]
    if len(chosen) > 1 or (chosen and recipe):
        raise DeployKitError(f"choose one of --recipe/--int8/--fp16/--bf16/--fp32 (got {len(chosen) + bool(recipe)})",
                             fix="drop the extra flags; a --recipe file already says its precision")
    if recipe:
        return recipe
    precision = chosen[0] if chosen else DEFAULT_PRECISION.get(target or "cpu", "int8")
    key = (precision, target or "cpu")
    if key not in PRESETS:
        ok = ", ".join(f"--{p} --target {t}" for p, t in PRESETS)
        raise DeployKitError(f"no built-in recipe for --{precision} --target {target}", fix=f"use one of: {ok}")
    return PRESETS[key]


@app.command()
def compress(
    checkpoint: Optional[Path] = typer.Argument(None, help="timm train.py / CheckpointSaver file, plain or DDP state_dict, "
                                                            "SWA AveragedModel, Lightning .ckpt, or .safetensors "
                                                            "(optional with --model)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe name or YAML path"),
    int8: bool = typer.Option(False, "--int8", help="preset: recipes/int8-ptq.yaml (the default)"),
    fp16: bool = typer.Option(False, "--fp16", help="preset: recipes/fp16.yaml (GPU targets)"),
    bf16: bool = typer.Option(False, "--bf16", help="preset: recipes/bf16.yaml (CPU, OpenVINO)"),
    fp32: bool = typer.Option(False, "--fp32", help="preset: recipes/fp32.yaml (export only)"),
    target: Optional[Target] = typer.Option(None, help="deployment target"),
    data: Optional[str] = typer.Option(None, help=f"{describe_datasets()}; or an ImageFolder dir; or none (data-free). Default: the dataset the checkpoint names, else data-free"),
    arch: Optional[str] = typer.Option(None, help="timm architecture, when the checkpoint does not say"),
    model: Optional[str] = typer.Option(None, "--model", help="your own model: FILE.py:NAME or package.module:NAME, "
                                        "a callable returning an nn.Module (kwargs: model.kwargs in a recipe). "
                                        "Importing it RUNS its code: only name files you trust"),
    weights: Optional[str] = typer.Option(None, help="which weights of a file holding several: ema | model | swa "
                                                     "(default: EMA when present)"),
    num_classes: Optional[int] = typer.Option(None, help="classifier outputs, when the checkpoint does not say"),
    in_chans: Optional[int] = typer.Option(None, help="input channels, when the checkpoint does not say"),
    input_size: Optional[str] = typer.Option(None, help="input size the model was trained at: 224, HxW (60x80) "
                                                        "or CxHxW (3x60x80)"),
    mean: Optional[str] = typer.Option(None, help="per-channel mean used in training, e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, help="per-channel std used in training, e.g. 0.229,0.224,0.225"),
    interpolation: Optional[str] = typer.Option(None, help="resize filter: bilinear | bicubic | nearest"),
    crop_pct: Optional[float] = typer.Option(None, help="centre-crop fraction at evaluation (timm eval), 0-1"),
    calibration_images: Optional[int] = typer.Option(None, help="number of calibration images"),
    calibration_method: Optional[CalibMethod] = typer.Option(None, help="INT8 range calibration"),
    prune: Optional[float] = typer.Option(None, min=0.0, max=0.95,
                                          help="preset: prune this fraction of MACs + KD fine-tune + INT8 (prune-kd-int8)"),
    target_latency: Optional[str] = typer.Option(None, "--target-latency",
                                                 help="preset: prune to this measured latency (0.5x of the unpruned "
                                                      "model, or 3.2ms; OpenVINO INT8, batch 32) + KD + INT8 "
                                                      "(prune-latency-int8)"),
    max_drop: Optional[float] = typer.Option(None, min=0.0,
                                             help="accuracy budget in top-1 points: PTQ keeps sensitive layers in float; QAT and pruning recipes: the most the final model may lose against the original"),
    max_f1_drop: Optional[float] = typer.Option(None, "--max-f1-drop", min=0.0,
                                                help="macro-F1 budget in points against the original (recipes with "
                                                     "select_runtime)"),
    balance: Optional[Balance] = typer.Option(None, help="long-tailed data, in the fine-tuning stages (distill, "
                                              "qat): the class prior the label loss teaches: none (the data's), "
                                              "sampler (class-balanced batches) or effective_number (loss weights)"),
    eval_images: Optional[int] = typer.Option(None, help="evaluate on this many images (default: whole split)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: physical cores)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="artifact directory (default <ckpt-stem>.deploykit)"),
    overwrite: bool = typer.Option(False, help="replace an existing artifact directory (only once the new one is complete)"),
    trust_pickle: bool = typer.Option(False, help="allow unpickling arbitrary objects: only for files you trust"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip accuracy and latency evaluation"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="any recipe field, dotted, value as YAML "
                                             "(repeatable): --set stages.select_runtime.objective=latency"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe and stop"),
) -> None:
    """Fuse Conv-BN, export ONNX, quantize, verify and evaluate: one artifact directory."""
    from .recipe import load_recipe

    try:
        tgt = target.value if target else None
        if prune is not None and target_latency is not None:
            raise DeployKitError("--prune and --target-latency both set how much to prune",
                                 fix="give one: --target-latency 0.5x (measured) or --prune 0.5 (MACs)")
        if (prune is not None or target_latency is not None) and not recipe:
            if fp16 or bf16 or fp32:
                raise DeployKitError("pruning builds an INT8 model", fix="use --prune/--target-latency with --int8 "
                                                                        "(or alone)")
            recipe, int8 = ("prune-kd-int8" if prune is not None else "prune-latency-int8"), False
        r = load_recipe(preset_recipe(recipe, int8, fp16, bf16, fp32, tgt))
        budget_key = "stages.accuracy_guard.max_drop"
        if max_drop is not None and not r.stage("accuracy_guard"):
            if r.stage("select_runtime") and (r.stage("qat") or r.stage("prune") or r.stage("distill")):
                # a QAT model is judged by select_runtime (the guard would re-quantize it with PTQ, undoing QAT); a
                # pruned one too: its budget is against the original, at the end of the chain
                budget_key = "stages.select_runtime.max_top1_drop"
            elif not r.stage("quantize_onnx"):
                raise DeployKitError(f"--max-drop needs an INT8 recipe, {r.name!r} has no quantize_onnx stage",
                                     fix="use --int8 or --prune with --max-drop")
            else:
                # the guard owns the accuracy decision, so quantize_onnx must not fail first
                r = r.with_stage("accuracy_guard", after="quantize_onnx").with_overrides(
                    {"stages.quantize_onnx.min_top1_agreement": 0})
        calib_stage = "quantize_tensorrt" if r.stage("quantize_tensorrt") else "quantize_onnx"
        r = r.with_overrides({
            "target": target.value if target else None,
            "data.name": data,
            "data.calibration_images": calibration_images,
            "data.eval_images": eval_images,
            "model.arch": arch,
            "model.num_classes": num_classes,
            "model.in_chans": in_chans,
            "model.input_size": input_size,
            "model.factory": model,
            "model.weights": weights,
            "model.mean": _floats(mean, "--mean"),
            "model.std": _floats(std, "--std"),
            "model.interpolation": interpolation,
            "model.crop_pct": crop_pct,
            "model.trust_pickle": trust_pickle or None,
            "eval.enabled": False if no_eval else None,
            "eval.threads": threads,
            f"stages.{calib_stage}.method": calibration_method.value if calibration_method else None,
            "stages.prune.macs_reduction": prune,
            "stages.prune.target_latency": target_latency,
            budget_key: max_drop,
        })
        if max_f1_drop is not None:
            if not r.stage("select_runtime"):
                raise DeployKitError(f"--max-f1-drop needs a recipe that chooses the runtime; {r.name!r} does not",
                                     fix="use --int8, --target-latency or a recipe with select_runtime")
            r = r.with_overrides({"stages.select_runtime.max_macro_f1_drop": max_f1_drop})
        if balance is not None:
            trainers = [name for name in ("distill", "qat") if r.stage(name)]
            if not trainers:
                raise DeployKitError(f"--balance needs a recipe that fine-tunes; {r.name!r} has no distill or qat "
                                     "stage", fix="use --target-latency, --prune or --recipe qat-int8 with --balance")
            r = r.with_overrides({f"stages.{name}.balance": balance.value for name in trainers})
        if set_:
            r = r.with_overrides(_settings(set_))
        if checkpoint is None and not r.model.factory:
            raise DeployKitError("no checkpoint given", fix="pass a checkpoint file, or --model FILE.py:NAME")
        if dry_run:
            typer.echo(f"# resolved recipe for {checkpoint or r.model.factory}\n" + r.to_yaml(), nl=False)
            return
        from .api import compress as run_compress
        from .report import print_summary

        res = run_compress(checkpoint, r, out=out, overwrite=overwrite)
        if res.report.get("models"):
            print_summary(res.report)
    except DeployKitError as err:
        fail(err)


def _settings(items: list[str]) -> dict:
    """['a.b=1', 'c=[1, 32]'] -> {'a.b': 1, 'c': [1, 32]} (values read as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DeployKitError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set stages.select_runtime.rounds=3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DeployKitError(f"--set {item!r}: the value is not valid YAML",
                                 fix="quote strings with spaces; lists as [1, 32]") from None
    return out


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise DeployKitError(f"{flag} {text!r} is not a comma-separated list of numbers",
                             fix=f"e.g. {flag} 0.485,0.456,0.406") from None


@app.command("recipes")
def recipes_cmd() -> None:
    """List the built-in recipes, and the stages, runtime variants and datasets a recipe can name."""
    from .data import DATASETS
    from .recipe import list_recipes, load_recipe
    from .stages import STAGES
    from .variants import RUNTIME_VARIANTS

    typer.echo("recipes:")
    for name in list_recipes():
        typer.echo(f"  {name:20s} {load_recipe(name).description}")
    typer.echo("stages:")
    for name, cls in STAGES.items():
        typer.echo(f"  {name:20s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    typer.echo("runtime variants (select_runtime candidates/force):")
    for name, v in RUNTIME_VARIANTS.items():
        vs = f" vs {v.counterpart}" if v.counterpart else " (reference)" if name == "onnxruntime-fp32" else ""
        typer.echo(f"  {name:20s} {v.backend} {v.precision} on the {v.model} model{vs}")
    typer.echo("datasets (--data):")
    for name, spec in DATASETS.items():
        typer.echo(f"  {name:20s} {spec.description}")


@app.command()
def version() -> None:
    """Print deploykit's version."""
    from . import __version__

    typer.echo(__version__)


def _register_commands() -> None:
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"deploykit.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"deploykit.commands.{name}":
                raise
            continue
        module.register(app)


_register_commands()


def _stop_on_signal(signum, frame) -> None:
    """First SIGTERM/SIGINT: ask the run to stop at its next safe point (``deploykit.stop``); a second one stops now."""
    from .stop import request_stop, stop_code

    if stop_code() is not None:
        raise Terminated(stop_code())
    request_stop(128 + signum)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    try:
        app()
        from .stop import check_stop

        check_stop()  # a stop that came after the last check: still exit with its code
    except DeployKitError as err:  # errors raised outside a command body
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Terminated as stop:
        # Cleanup has run. Skip interpreter teardown: native runtimes' worker threads (OpenVINO, ORT, OpenMP)
        # interrupted mid-call crashed it with SIGSEGV once in the tests, which would mask the real exit code.
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code)


if __name__ == "__main__":
    main()
