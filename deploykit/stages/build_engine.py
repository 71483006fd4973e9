"""The ``build_engine`` stage: a TensorRT engine beside the pipeline's ONNX, skipped where TensorRT/GPU is missing.

The engine library (building, ``engine.json``, compatibility checks, the GPU environment) lives with the
TensorRT backend in ``deploykit.backends.tensorrt_engine``; this module is only the pipeline step.

Example (recipe):
    stages:
      - build_engine: {precision: auto, max_batch: 64, if_unavailable: skip}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..backends.tensorrt_engine import (ENGINE_FILE, TRT_INSTALL_FIX, TensorRTUnavailable, build_engine,
                                        gpu_environment, tensorrt_status)
from ..errors import DeployKitError
from .base import PipelineState, Stage, register
from .config import StageConfig


@register("build_engine")
class BuildEngine(Stage):
    """Build a TensorRT engine from the stage's ONNX; skipped (with the reason) where TensorRT/GPU is missing."""

    class Config(StageConfig):
        precision: Literal["auto", "int8", "fp16", "fp32"] = "auto"
        min_batch: int = Field(1, ge=1)
        opt_batch: int = Field(8, ge=1)
        max_batch: int = Field(64, ge=1)
        workspace_mb: int = Field(2048, ge=64)
        timing_cache: str | None = Field(None, description="file reused across builds; default per TRT version and GPU")
        if_unavailable: Literal["skip", "fail"] = Field("skip", description="no TensorRT or no GPU here")

    def run(self, state: PipelineState) -> dict:
        from ..artifact import FINAL_MODEL

        c = self.config
        if state.onnx_path is None:
            raise DeployKitError("build_engine needs an ONNX model", fix="put export_onnx (and a quantize stage) before it")
        version, why = tensorrt_status()
        gpu_error = None if version is None else gpu_environment()["gpu_error"]
        if version is None or gpu_error:
            reason = why if version is None else f"no NVIDIA GPU visible ({gpu_error})"
            if c.if_unavailable == "fail":
                raise TensorRTUnavailable(reason, fix=TRT_INSTALL_FIX)
            state.log(f"[yellow]build_engine skipped:[/] {reason}. Build it on the GPU machine with "
                      "`deploykit build-engine ARTIFACT`")
            return {"skipped": True, "reason": reason, "fix": TRT_INSTALL_FIX}
        precision = state.precision if c.precision == "auto" else c.precision
        info = build_engine(state.onnx_path, state.workdir / ENGINE_FILE, precision, min_batch=c.min_batch,
                            opt_batch=c.opt_batch, max_batch=c.max_batch, workspace_mb=c.workspace_mb,
                            timing_cache=c.timing_cache, onnx_name=FINAL_MODEL)
        return {"skipped": False, "engine": info["engine"], "tensorrt": info["tensorrt"], "gpu": info["gpu"],
                "build_seconds": info["build_seconds"]}
