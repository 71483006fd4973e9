"""OpenVINO backend: reads an ONNX file or an OpenVINO IR (``.xml`` + ``.bin``) and compiles it for CPU.

Every setting that changes speed is explicit and recorded in ``info()``: threads, the performance
hint (LATENCY = one stream, THROUGHPUT = several), and the inference precision of float layers.
Why explicit precision: OpenVINO's default on a CPU that advertises BF16 is bf16, which without AMX
ran *slower* than f32 (49.5 vs 29.9 ms, resnet50 bs1, on the AVX-512 machine). So "fp32" and "int8"
force f32 for float layers, and bf16 is used only when asked for (and measured by select_runtime).

Example:
    >>> be = create_backend("openvino", "model.ov.xml", threads=2, precision="int8")
    >>> be.run(np.zeros((1, 1, 28, 28), np.float32)).shape
    (1, 10)
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..doctor import Check, installed_version
from ..errors import ArtifactError
from ..variants import REFERENCE, RuntimeVariant, register_variant
from .base import BACKENDS, Backend, missing_module, physical_cores

# What float layers compute in. An INT8 model keeps its quantized layers whatever this says.
_PRECISION_HINT = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def cpu_capabilities() -> list[str]:
    """OpenVINO's CPU optimisation capabilities, e.g. ['FP32', 'INT8', 'BF16'] (BF16 only with avx512_bf16/AMX)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def save_ir(model_path: str | Path, xml_path: str | Path) -> Path:
    """Convert an ONNX (or re-save an IR) to OpenVINO IR ``xml_path`` (+ ``.bin``), atomically, weights kept f32.

    Example:
        >>> save_ir("model.fp32.onnx", "model.fp32.ov.xml")
    """
    import openvino as ov

    xml_path = Path(xml_path)
    tmp = xml_path.with_name(f".{xml_path.stem}.tmp.xml")
    # compress_to_fp16=False: the default halves weights to f16, which is not what "fp32" promises.
    ov.save_model(ov.Core().read_model(str(model_path)), str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), xml_path.with_suffix(".bin"))
    os.replace(tmp, xml_path)  # the .xml last: a reader that sees it also sees its .bin
    return xml_path


def _plain(value: Any) -> Any:
    """A property value as JSON: ov.Type -> 'f32', enums -> their name."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def check_openvino() -> Check:
    v = installed_version("openvino")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import openvino as ov

            devices = ov.Core().available_devices
    except Exception as err:
        return Check("openvino", False, v, why=f"{'not installed' if v is None else f'does not work ({err})'}",
                     fix="pip install openvino nncf (the `openvino` extra)")
    return Check("openvino", True, v, f"devices: {', '.join(devices)}", extra={"devices": devices})


# LATENCY: one request on all threads, the way a batch-1 service and select_runtime's timing run it.
_OV = {"hint": "LATENCY"}
register_variant(RuntimeVariant("openvino-fp32", "openvino", "fp32-onnx", "fp32", counterpart=REFERENCE,
                                settings=_OV))
register_variant(RuntimeVariant("openvino-bf16", "openvino", "fp32-onnx", "bf16", counterpart="openvino-fp32",
                                settings=_OV, needs="bf16"))
register_variant(RuntimeVariant("openvino-int8", "openvino", "openvino-int8", "int8", counterpart="openvino-fp32",
                                settings=_OV))
register_variant(RuntimeVariant("openvino-int8-onnx", "openvino", "openvino-int8-onnx", "int8",
                                counterpart="openvino-fp32", settings=_OV))
register_variant(RuntimeVariant("openvino-qdq", "openvino", "int8-qdq", "int8", counterpart="openvino-fp32",
                                settings=_OV))
register_variant(RuntimeVariant("openvino-qat", "openvino", "qat-qdq", "int8", counterpart="openvino-fp32",
                                settings=_OV, retrained=True))


@BACKENDS.register("openvino")
class OpenVinoBackend(Backend):
    """A model compiled by OpenVINO for one device (CPU here).

    Args:
        model: ``.onnx`` or ``.xml`` (its ``.bin`` beside it).
        threads: inference threads; None = physical cores.
        precision: what the model is ("fp32", "int8", "bf16", "fp16"); sets INFERENCE_PRECISION_HINT.
        hint: PERFORMANCE_HINT; LATENCY (default) runs one request on all threads.
        num_streams: override the streams the hint picks (None = leave to the hint).
    """

    name = "openvino"
    packages = ("openvino",)
    reads = (".onnx", ".xml")  # ONNX (QDQ graphs included) or an OpenVINO IR

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        return missing_module("openvino", "pip install openvino nncf: the `openvino` extra")

    @classmethod
    def doctor_checks(cls):
        return (check_openvino,)

    def __init__(self, model: str | Path, threads: int | None = None, precision: str = "fp32",
                 hint: str = "LATENCY", device: str = "CPU", num_streams: int | None = None):
        import openvino as ov

        super().__init__(precision)
        self.path = Path(model)
        if not self.path.exists():
            raise ArtifactError(f"OpenVINO model {self.path} does not exist",
                                fix="re-run compress or point at the .xml/.onnx")
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").exists():
            raise ArtifactError(f"OpenVINO IR {self.path.name} has no weights file "
                                f"{self.path.with_suffix('.bin').name}",
                                fix="copy the .bin next to the .xml")
        if precision not in _PRECISION_HINT:
            raise ValueError(f"precision {precision!r} not one of {sorted(_PRECISION_HINT)}")
        if hint not in HINTS:
            raise ValueError(f"hint {hint!r} not one of {HINTS}")
        self.threads = threads or physical_cores()
        self.hint = hint
        self.device = device
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": _PRECISION_HINT[precision],
        }
        if num_streams is not None:
            config["NUM_STREAMS"] = num_streams
        self.compiled = core.compile_model(core.read_model(str(self.path)), device, config)
        self.request = self.compiled.create_infer_request()
        self.version = ov.get_version()
        # What OpenVINO actually applied (a hint it cannot honour is silently lowered, e.g. bf16 without avx512_bf16).
        self.applied = {k: _plain(self.compiled.get_property(k))
                        for k in ("INFERENCE_PRECISION_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")}

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.request.infer({0: x})
        # copy: the output tensor's memory is reused by the next infer()
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version, "threads": self.threads, "hint": self.hint,
                "device": self.device, "model": self.path.name, "applied": self.applied}
