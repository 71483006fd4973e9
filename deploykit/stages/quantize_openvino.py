"""INT8 post-training quantization for OpenVINO with NNCF, on the same calibration inputs as quantize_onnx.

NNCF quantizes either the OpenVINO model read from the float ONNX (IR ``model.ov.xml/.bin``, the default)
or the ONNX graph itself (a Q/DQ ``model.nncf.int8.onnx`` that OpenVINO and ONNX Runtime both read). Both were
measured side by side (``format: both``): the same speed within noise, equal fidelity on resnet50 (37.5 dB SQNR),
but on the Fashion-MNIST reference the IR kept closer to FP32 (23.1 vs 21.4 dB SQNR, 99.34 vs 98.73% top-1
agreement on 10,000 images), so the IR is the default. See docs/runtimes.md.
The stage only writes the model and checks it against FP32; ``select_runtime`` decides whether it ships.

Example:
    >>> quantize_openvino(Path("model.fp32.onnx"), Path("model.ov.xml"), calib, fmt="ir")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ParityError
from .config import StageConfig
from .base import PipelineState, Stage, register
from .export_onnx import INPUT_NAME

IR_FILE, ONNX_FILE = "model.ov.xml", "model.nncf.int8.onnx"


def quantize_openvino(src: Path, dst: Path, calibration: np.ndarray, *, fmt: str = "ir",
                      preset: str = "performance", subset_size: int = 300, fast_bias_correction: bool = True,
                      ignored_names: list[str] | None = None) -> Path:
    """NNCF PTQ of the float ONNX ``src`` calibrated on ``calibration`` (NCHW float32); writes ``dst`` atomically.

    Args:
        fmt: "ir" (OpenVINO model, saved as .xml/.bin) or "onnx" (NNCF's ONNX backend, Q/DQ ONNX).
        preset: "performance" (symmetric activations, fastest) or "mixed" (asymmetric activations).
        subset_size: calibration samples NNCF uses (capped at len(calibration)).
    Returns:
        ``dst``.
    """
    import nncf

    # One image per item: NNCF's statistics and bias correction assume per-sample items.
    items = [calibration[i:i + 1] for i in range(len(calibration))]
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    kwargs = dict(preset=presets[preset],
                  target_device=nncf.TargetDevice.CPU, subset_size=min(subset_size, len(items)),
                  fast_bias_correction=fast_bias_correction)
    if ignored_names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored_names), validate=False)
    if fmt == "ir":
        import openvino as ov

        quantized = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(items), **kwargs)
        tmp = dst.with_name(f".{dst.stem}.tmp.xml")
        ov.save_model(quantized, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), dst.with_suffix(".bin"))
        os.replace(tmp, dst)  # the .xml last: whoever sees it also sees its weights
    elif fmt == "onnx":
        import onnx

        quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset([{INPUT_NAME: x} for x in items]), **kwargs)
        tmp = dst.with_name(f".{dst.name}.tmp")
        onnx.save(quantized, str(tmp))
        os.replace(tmp, dst)
    else:
        raise ValueError(f"fmt must be 'ir' or 'onnx', got {fmt!r}")
    return dst


def model_files(path: Path) -> list[str]:
    """The files that make up a model: an IR is its .xml and .bin."""
    return [path.name, path.with_suffix(".bin").name] if path.suffix == ".xml" else [path.name]


@register("quantize_openvino")
class QuantizeOpenVino(Stage):
    """Float ONNX -> NNCF INT8 model for OpenVINO CPU, checked against FP32 on held-out inputs."""

    class Config(StageConfig):
        format: Literal["ir", "onnx", "both"] = Field(
            "ir", description="ir: model.ov.xml/.bin; onnx: Q/DQ model.nncf.int8.onnx; both: write both, "
                              "so select_runtime measures them side by side")
        preset: Literal["performance", "mixed"] = "performance"
        subset_size: int = Field(300, ge=1, description="calibration images NNCF uses (at most those given)")
        fast_bias_correction: bool = True
        ignored_names: list[str] = Field(default_factory=list, description="node names kept in float")
        min_top1_agreement: float = Field(90.0, ge=0, le=100, description="vs FP32 ONNX; below this *and* below "
                                                                          "min_sqnr_db the run fails")
        min_sqnr_db: float = Field(20.0, description="SQNR vs FP32 that excuses a low agreement on near-tied logits")
        threads: int | None = Field(None, ge=1, description="OpenVINO threads for the parity check")

    def run(self, state: PipelineState) -> dict:
        from ..backends import create_backend
        from ..evaluate import fidelity

        c = self.config
        src = state.onnx_fp32_path
        if src is None:
            raise ParityError("quantize_openvino needs the float ONNX model",
                              fix="put export_onnx before it in the recipe")
        calib = state.calibration_inputs()
        formats = ("ir", "onnx") if c.format == "both" else (c.format,)
        x = state.check_inputs()
        ref = _run_batched(create_backend("onnxruntime", src, threads=c.threads), x)
        outputs, fids = {}, {}
        for fmt in formats:
            dst = state.workdir / (IR_FILE if fmt == "ir" else ONNX_FILE)
            quantize_openvino(src, dst, calib, fmt=fmt, preset=c.preset, subset_size=c.subset_size,
                              fast_bias_correction=c.fast_bias_correction, ignored_names=c.ignored_names)
            fid = fidelity(ref, _run_batched(create_backend("openvino", dst, threads=c.threads, precision="int8"), x))
            if fid["top1_agreement"] < c.min_top1_agreement and fid["sqnr_db"] < c.min_sqnr_db:
                raise ParityError(f"OpenVINO INT8 model {dst.name} agrees with FP32 on only "
                                  f"{fid['top1_agreement']:.1f}% of inputs (limit {c.min_top1_agreement}%) at SQNR "
                                  f"{fid['sqnr_db']:.1f} dB (limit {c.min_sqnr_db})",
                                  fix="calibrate on real data (--data), try preset: mixed, or list sensitive nodes "
                                      "in ignored_names")
            outputs[fmt], fids[fmt] = dst.name, fid
        # The pipeline's shipped model is select_runtime's decision; this stage only offers candidates.
        primary = state.workdir / outputs[formats[0]]
        state.add_model("openvino-int8", primary)
        if len(formats) > 1:
            state.add_model("openvino-int8-onnx", state.workdir / outputs["onnx"])
        return {"file": primary.name, "files": model_files(primary), "outputs": outputs, "format": c.format,
                "preset": c.preset, "calibration_images": int(min(c.subset_size, len(calib))),
                "fidelity_vs_fp32": fids[formats[0]], "fidelity_by_format": fids, "inputs_checked": int(len(x))}


def _run_batched(backend, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([backend.run(x[i:i + batch]) for i in range(0, len(x), batch)])
