"""INT8 explicit-quantization (Q/DQ) ONNX placed the way TensorRT fuses it, verified on ONNX Runtime CPU.

TensorRT deprecated implicit INT8 calibration (10.1) and removed it in 11: INT8 engines are built from
ONNX graphs that carry their own QuantizeLinear/DequantizeLinear pairs. nvidia-modelopt's ONNX PTQ
places them for TensorRT: symmetric INT8, per-channel weights, Q/DQ in front of every Conv input,
residual Adds left for TensorRT to fuse into the preceding Conv, and small GEMMs (a 10-class head)
left float because INT8 tensor-core kernels need K, N >= 16.

That graph is not a CPU graph: on ONNX Runtime CPU it ran 1.9x *slower* than FP32 (resnet18, see
docs/gpu.md). Here it is only *verified* on CPU (accuracy, agreement with FP32, structure); the CPU
target keeps its own recipe (int8-ptq). When modelopt is missing, ONNX Runtime's ``quantize_static``
with symmetric S8S8 QDQ settings (which TensorRT also accepts) is used instead, and the report says so.

Example:
    >>> quantize_for_tensorrt(Path("m.onnx"), Path("m.int8.onnx"), calib, method="entropy")
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import DeployKitError, ParityError
from .config import StageConfig
from .base import PipelineState, RuntimeChoice, Stage, register
from .export_onnx import INPUT_NAME


def modelopt_available() -> tuple[bool, str]:
    """(usable, reason): whether nvidia-modelopt's ONNX quantizer imports here."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import modelopt.onnx.quantization  # noqa: F401
    except Exception as err:  # ImportError, or its own re-raised ImportError with a hint
        first = str(err).splitlines()[0]
        return False, (f"nvidia-modelopt's ONNX quantizer does not import ({first}); install it with "
                       "`pip install nvidia-modelopt onnx-graphsurgeon onnxslim requests` (not the [onnx] extra)")
    return True, "nvidia-modelopt available"


def _quantize_modelopt(src: Path, dst: Path, calib: np.ndarray, method: str, quantize_small_gemms: bool,
                       exclude_nodes: list[str]) -> None:
    """Run modelopt's ONNX PTQ in a child process.

    Why a child: ``modelopt.onnx.quantization.quantize`` monkey-patches onnxruntime.quantization's
    calibrators process-wide (ort_patching.patch_ort_modules) and never restores them; afterwards a plain
    ``quantize_static`` in the same process fails ("Quantization parameters are not specified for param
    input"), which broke the CPU int8 stage. The child also keeps modelopt's NVML error and progress
    bars out of our console.
    """
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calib)
        args = {"src": str(src), "dst": str(dst), "calib": str(calib_path), "method": method,
                "quantize_small_gemms": quantize_small_gemms, "exclude_nodes": exclude_nodes}
        res = subprocess.run([sys.executable, "-m", __name__, json.dumps(args)], capture_output=True, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        tail = [line for line in res.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ParityError(f"nvidia-modelopt quantization failed: {tail[0]}",
                          fix="set stages.quantize_tensorrt.tool: onnxruntime, or exclude the failing node")


def _modelopt_child(args: dict) -> None:
    from modelopt.onnx.quantization import quantize

    # ORT's calibrator warns once per fused bias ("Expected bias ... to be an initializer"): not actionable.
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize(args["src"], quantize_mode="int8", calibration_data={INPUT_NAME: np.load(args["calib"])},
                 calibration_method={"entropy": "entropy", "max": "max", "minmax": "max"}[args["method"]],
                 calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=args["dst"],
                 nodes_to_exclude=list(args["exclude_nodes"]) or None, log_level="ERROR",
                 enable_gemv_detection_for_trt=not args["quantize_small_gemms"])


def _quantize_ort_symmetric(src: Path, dst: Path, calib: np.ndarray, method: str, exclude_nodes: list[str],
                            batch_size: int = 32) -> None:
    """ORT fallback: S8 activations and S8 weights, both symmetric (zero point 0), per-channel weights."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = (calib[i:i + batch_size] for i in range(0, len(calib), batch_size))

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"],  # TensorRT picks the rest itself
                        calibrate_method={"entropy": CalibrationMethod.Entropy, "max": CalibrationMethod.MinMax,
                                          "minmax": CalibrationMethod.MinMax}[method],
                        nodes_to_exclude=list(exclude_nodes),
                        # TensorRT has no INT32 DequantizeLinear: biases stay float and it fuses them itself.
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


def quantize_for_tensorrt(src: Path, dst: Path, calib: np.ndarray, *, tool: str = "auto", method: str = "max",
                          quantize_small_gemms: bool = False, exclude_nodes: list[str] | None = None) -> dict:
    """Write a TensorRT-ready INT8 Q/DQ ONNX of ``src`` to ``dst``, calibrated on ``calib`` (N,C,H,W float32).

    Args:
        tool: "modelopt", "onnxruntime", or "auto" (modelopt when it imports, else ONNX Runtime).
        method: "max" (default) or "entropy" range calibration.
    Returns:
        {"tool": ..., "tool_reason": ...}
    """
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    ok, reason = modelopt_available() if tool in ("auto", "modelopt") else (False, "onnxruntime requested")
    if tool == "modelopt" and not ok:
        raise DeployKitError(reason, fix="install nvidia-modelopt, or set stages.quantize_tensorrt.tool: onnxruntime")
    used = "modelopt" if ok else "onnxruntime"
    if used == "modelopt":
        _quantize_modelopt(src, dst, calib, method, quantize_small_gemms, list(exclude_nodes or []))
    else:
        _quantize_ort_symmetric(src, dst, calib, method, list(exclude_nodes or []))
    if not dst.is_file():
        raise ParityError(f"{used} produced no quantized model at {dst}", fix="run with --calibration-images >= 32")
    return {"tool": used, "tool_reason": reason}


@register("quantize_tensorrt")
class QuantizeTensorRT(Stage):
    """Float ONNX -> INT8 Q/DQ ONNX for TensorRT; verified here on ONNX Runtime CPU and structurally."""

    class Config(StageConfig):
        tool: Literal["auto", "modelopt", "onnxruntime"] = "auto"
        method: Literal["entropy", "max", "minmax"] = Field("max", description='"minmax" is an alias of "max"')
        quantize_small_gemms: bool = Field(False, description="also quantize GEMMs with K or N < 16 (e.g. the head)")
        exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names kept in float")
        min_top1_agreement: float = Field(90.0, ge=0, le=100, description="vs FP32 ONNX; below this the run fails")

    def run(self, state: PipelineState) -> dict:
        from ..backends import create_backend, run_batched
        from ..evaluate import fidelity
        from ..onnx_checks import check_qdq_placement

        c = self.config
        src = state.onnx_fp32_path or state.onnx_path
        if src is None:
            raise ParityError("quantize_tensorrt needs a float ONNX model", fix="put export_onnx before it in the recipe")
        calib = state.calibration_inputs()
        dst = state.workdir / "model.int8.onnx"
        used = quantize_for_tensorrt(src, dst, calib, tool=c.tool, method=c.method,
                                     quantize_small_gemms=c.quantize_small_gemms, exclude_nodes=c.exclude_nodes)
        if used["tool"] != "modelopt":
            state.log(f"[yellow]warning:[/] quantize_tensorrt fell back to {used['tool']}: {used['tool_reason']}")
        structure = check_qdq_placement(dst, small_gemm_dim=0 if c.quantize_small_gemms else 16,
                                        allow_float=tuple(c.exclude_nodes))
        x = state.check_inputs()
        # Verified on the CPU provider on purpose: the same graph TensorRT will build, run by a second runtime.
        ref, got = (run_batched(create_backend("onnxruntime", p).run, x) for p in (src, dst))
        fid = fidelity(ref, got)
        if fid["top1_agreement"] < c.min_top1_agreement:
            raise ParityError(f"TensorRT INT8 Q/DQ model agrees with FP32 on only {fid['top1_agreement']:.1f}% of "
                              f"inputs (limit {c.min_top1_agreement}%)",
                              fix="calibrate on real data (--data), try method: max, or exclude sensitive nodes")
        state.onnx_path, state.precision = dst, "int8"
        # On a GPU machine with onnxruntime-gpu this picks TensorRT/CUDA providers; elsewhere it falls back
        # to CPU with a stated reason (see backends/onnxruntime_backend.py). `deploykit build-engine` makes
        # the native TensorRT engine.
        state.runtime = RuntimeChoice("onnxruntime", {"device": "gpu"})
        return {"file": dst.name, "tool": used["tool"], "tool_reason": used["tool_reason"], "method": c.method,
                "calibration_images": int(len(calib)), "structure": {k: structure[k] for k in
                                                                     ("ok", "counts", "float_by_rule")},
                "fidelity_vs_fp32": fid, "verified_on": "onnxruntime CPUExecutionProvider"}


if __name__ == "__main__":  # the modelopt child process, see _quantize_modelopt
    import json
    import sys

    _modelopt_child(json.loads(sys.argv[1]))
