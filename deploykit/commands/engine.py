"""`deploykit build-engine` and `deploykit check-engine`: TensorRT engines next to an artifact's ONNX.

Example:
    $ deploykit build-engine resnet.deploykit --precision int8 --max-batch 64
    $ deploykit check-engine resnet.deploykit          # exit 0 compatible, 1 mismatch
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class EnginePrecision(str, Enum):
    auto = "auto"
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


def register(app: typer.Typer) -> None:
    app.command("build-engine")(build_engine_cmd)
    app.command("check-engine")(check_engine_cmd)


def build_engine_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory written by `deploykit compress`"),
    precision: EnginePrecision = typer.Option(EnginePrecision.auto, help="auto = the artifact's precision"),
    min_batch: int = typer.Option(1, help="optimization profile: smallest batch"),
    opt_batch: int = typer.Option(8, help="optimization profile: batch the kernels are tuned for"),
    max_batch: int = typer.Option(64, help="optimization profile: largest batch"),
    workspace_mb: int = typer.Option(2048, help="builder workspace memory limit (MiB)"),
    timing_cache: Optional[Path] = typer.Option(None, help="timing cache file reused across builds"),
) -> None:
    """Build model.engine + engine.json inside ARTIFACT with TensorRT (needs an NVIDIA GPU and TensorRT)."""
    from ..cli import fail
    from ..errors import DeployKitError

    try:
        from ..backends.tensorrt_engine import build_artifact_engine

        info = build_artifact_engine(artifact, precision.value, min_batch=min_batch, opt_batch=opt_batch,
                                     max_batch=max_batch, workspace_mb=workspace_mb, timing_cache=timing_cache)
        typer.echo(f"wrote {artifact / info['engine']} ({info['precision']}, TensorRT {info['tensorrt']}, "
                   f"{info['gpu']}, batch {info['batch']['min']}-{info['batch']['max']}) in {info['build_seconds']} s")
    except DeployKitError as err:
        fail(err)


def check_engine_cmd(
    artifact: Path = typer.Argument(..., help="artifact directory (or an engine.json)"),
) -> None:
    """Compare ARTIFACT's engine.json with this machine's TensorRT and GPU, without loading the engine."""
    from ..cli import fail
    from ..errors import DeployKitError
    from ..backends.tensorrt_engine import ENGINE_JSON, EngineMismatchError, check_engine_compatible

    path = artifact if artifact.suffix == ".json" else artifact / ENGINE_JSON
    try:
        if not path.is_file():
            raise DeployKitError(f"no {ENGINE_JSON} in {artifact}", fix=f"build one: `deploykit build-engine {artifact}`")
        for line in check_engine_compatible(path):
            typer.echo(line)
        typer.echo(f"{path}: compatible with this machine")
    except EngineMismatchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    except DeployKitError as err:
        fail(err)
