"""INT8 post-training quantization for OpenVINO with NNCF, on the same calibration inputs as quantize_onnx.

NNCF quantizes either the OpenVINO model read from the float ONNX (IR ``model.ov.xml/.bin``, the default)
or the ONNX graph itself (a Q/DQ ``model.nncf.int8.onnx`` that OpenVINO and ONNX Runtime both read). Both were
measured side by side (``format: both``): the same speed within noise, equal fidelity on resnet50 (37.5 dB SQNR),
but on the Fashion-MNIST reference the IR kept closer to FP32 (23.1 vs 21.4 dB SQNR, 99.34 vs 98.73% top-1
agreement on 10,000 images), so the IR is the default. See docs/runtimes.md.
The stage only writes the model and checks it against FP32; ``select_runtime`` decides whether it ships.

Transformer graphs (``model_type: auto`` detects them like quantize_onnx: MatMul with Softmax or LayerNorm) are
quantized with ``nncf.ModelType.TRANSFORMER``: NNCF then keeps LayerNorm, Softmax, GELU and the residual Adds in
float and smooths activation outliers into the MatMul weights (SmoothQuant). Without it a small timm ViT came
out at 0.2 dB SQNR, 7.4% agreement with FP32 (a user's Fashion-MNIST run); a 2-block ViT with random weights on
64 digits images 5.9 dB / 42% without, 29.2 dB / 100% with it (MobileViT-v2 4.4 -> 26.9 dB, EfficientViT-B0
0.4 -> 28.3 dB). With ``on_fidelity_failure: withhold`` a model that fails its check, or that NNCF cannot
quantize, is kept out of select_runtime's candidates instead of failing the run.

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
from .config import Int8CheckConfig
from .base import PipelineState, Stage, register
from .export_onnx import INPUT_NAME
from .quantize_onnx import ModelType, detect_model_type

IR_FILE, ONNX_FILE = "model.ov.xml", "model.nncf.int8.onnx"


def quantize_openvino(src: Path, dst: Path, calibration: np.ndarray, *, fmt: str = "ir",
                      preset: str = "performance", subset_size: int = 300, fast_bias_correction: bool = True,
                      ignored_names: list[str] | None = None, model_type: str = "cnn",
                      smooth_quant: bool = True) -> Path:
    """NNCF PTQ of the float ONNX ``src`` calibrated on ``calibration`` (NCHW float32); writes ``dst`` atomically.

    Args:
        fmt: "ir" (OpenVINO model, saved as .xml/.bin) or "onnx" (NNCF's ONNX backend, Q/DQ ONNX).
        preset: "performance" (symmetric activations, fastest) or "mixed" (asymmetric activations).
        subset_size: calibration samples NNCF uses (capped at len(calibration)).
        model_type: "transformer" passes ``nncf.ModelType.TRANSFORMER``; "cnn" leaves NNCF's default.
        smooth_quant: False turns off the SmoothQuant NNCF applies to a transformer's MatMuls.
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
    if model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if not smooth_quant:
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
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

    class Config(Int8CheckConfig):
        format: Literal["ir", "onnx", "both"] = Field(
            "ir", description="ir: model.ov.xml/.bin; onnx: Q/DQ model.nncf.int8.onnx; both: write both, "
                              "so select_runtime measures them side by side")
        preset: Literal["performance", "mixed"] = "performance"
        subset_size: int = Field(300, ge=1, description="calibration images NNCF uses (at most those given)")
        fast_bias_correction: bool = True
        ignored_names: list[str] = Field(default_factory=list, description="node names kept in float")
        threads: int | None = Field(None, ge=1, description="OpenVINO threads for the parity check")
        smooth_quant: Literal["auto", "on", "off"] = Field(
            "auto", description="SmoothQuant (NNCF applies it to transformers' MatMuls); auto: on, and when the model "
                                "then fails its check, quantized once more without it")
        model_type: ModelType = Field("auto", description="transformer: nncf.ModelType.TRANSFORMER (LayerNorm, "
                                                          "Softmax, GELU stay float; SmoothQuant); auto: detect "
                                                          "from the graph (MatMul with Softmax or LayerNorm)")

    def run(self, state: PipelineState) -> dict:
        c = self.config
        src = state.onnx_fp32_path
        if src is None:
            raise ParityError("quantize_openvino needs the float ONNX model",
                              fix="put export_onnx before it in the recipe")
        calib = state.calibration_inputs()
        formats = ("ir", "onnx") if c.format == "both" else (c.format,)
        model_type = c.model_type if c.model_type != "auto" else detect_model_type(src, state.model)
        x = state.check_inputs()
        ref = state.reference_check_logits()
        outputs, fids, withheld, attempts = {}, {}, {}, {}
        # SmoothQuant helped ViT/DeiT but cost Swin (random weights, 32x32): 11.5 dB / 69% agreement with it,
        # 24.5 dB / 95% without. "auto" keeps NNCF's default and retries without it only when the check fails.
        tries = [c.smooth_quant != "off"] + ([False] if c.smooth_quant == "auto" and model_type == "transformer"
                                             else [])
        for fmt in formats:
            dst = state.workdir / (IR_FILE if fmt == "ir" else ONNX_FILE)
            outputs[fmt], attempts[fmt] = dst.name, []
            for sq in tries:
                fid, problem = self._attempt(state, src, dst, calib, x, ref, fmt, model_type, sq)
                attempts[fmt].append({"smooth_quant": sq, "sqnr_db": fid and fid["sqnr_db"],
                                      "top1_agreement": fid and fid["top1_agreement"], "problem": problem})
                if problem is None:
                    break
            fids[fmt] = fid
            if problem is not None:
                if c.on_fidelity_failure == "error":
                    raise ParityError(problem, fix="calibrate on real data (--data), try preset: mixed or "
                                                   "model_type: transformer, or list sensitive nodes in ignored_names")
                withheld[fmt] = problem
                state.log(f"[yellow]quantize_openvino ({model_type}): {problem}; withheld from the candidates[/]")
        # The pipeline's shipped model is select_runtime's decision; this stage only offers candidates.
        # A withheld model is deleted: an artifact holds no model that failed its check.
        primary = state.workdir / outputs[formats[0]]
        for fmt, kind in zip(formats, ("openvino-int8", "openvino-int8-onnx")):
            path = state.workdir / outputs[fmt]
            if fmt in withheld:
                state.withheld[kind] = f"quantize_openvino ({model_type}): {withheld[fmt]}"
                for name in model_files(path):
                    (state.workdir / name).unlink(missing_ok=True)
                outputs[fmt] = None
            else:
                state.add_model(kind, path)
        return {"file": outputs[formats[0]], "files": model_files(primary) if outputs[formats[0]] else [],
                "outputs": outputs, "withheld": withheld, "format": c.format, "preset": c.preset,
                "model_type": model_type, "attempts": attempts,
                "calibration_images": int(min(c.subset_size, len(calib))),
                "fidelity_vs_fp32": fids[formats[0]], "fidelity_by_format": fids, "inputs_checked": int(len(x))}

    def _attempt(self, state: PipelineState, src, dst, calib, x, ref, fmt, model_type,
                 smooth_quant) -> tuple[dict | None, str | None]:
        """Quantize and check once: (fidelity, None) when it passes, (fidelity or None, the problem) when not."""
        from ..backends import run_batched
        from ..evaluate import fidelity

        c = self.config
        try:
            quantize_openvino(src, dst, calib, fmt=fmt, preset=c.preset, subset_size=c.subset_size,
                              fast_bias_correction=c.fast_bias_correction, ignored_names=c.ignored_names,
                              model_type=model_type, smooth_quant=smooth_quant)
            got = run_batched(state.backend("openvino", dst, threads=c.threads, precision="int8").run, x)
        except Exception as err:  # NNCF or OpenVINO failing on an unusual graph
            if c.on_fidelity_failure == "error":
                raise
            return None, (f"NNCF could not quantize or OpenVINO could not run the INT8 model "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:300]})")
        fid = fidelity(ref, got)
        problem = c.fidelity_problem(fid, state.data is None)
        if problem:
            return fid, f"OpenVINO INT8 model {dst.name} {problem}"
        return fid, None
