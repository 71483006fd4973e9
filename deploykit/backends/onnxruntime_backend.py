"""ONNX Runtime backend (CPU here; CUDA/TensorRT execution providers when onnxruntime-gpu and a GPU exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..variants import REFERENCE, RuntimeVariant, register_variant
from .base import BACKENDS, Backend, physical_cores

# Preference order on a GPU machine; each is used only if the installed onnxruntime offers it.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(device: str, have: list[str]) -> tuple[list[str], str]:
    """Execution providers for ``device`` in the stated fallback order TensorRT > CUDA > CPU, with a one-line reason.

    Example:
        >>> select_providers("gpu", ["CPUExecutionProvider"])[1]
        'CPU only: this onnxruntime has no GPU providers (install onnxruntime-gpu instead of onnxruntime)'
    """
    if device == "cpu":
        return ["CPUExecutionProvider"], "CPU requested"
    gpu = [p for p in GPU_PROVIDERS if p in have]
    if not gpu:
        return ["CPUExecutionProvider"], ("CPU only: this onnxruntime has no GPU providers "
                                          "(install onnxruntime-gpu instead of onnxruntime)")
    missing = [p for p in GPU_PROVIDERS if p not in have]
    why = f"{gpu[0]} first" + (f" ({', '.join(missing)} not in this onnxruntime)" if missing else "")
    return [*gpu, "CPUExecutionProvider"], why


register_variant(RuntimeVariant(REFERENCE, "onnxruntime", "fp32-onnx", "fp32"))
register_variant(RuntimeVariant("onnxruntime-int8", "onnxruntime", "int8-qdq", "int8", counterpart=REFERENCE))
register_variant(RuntimeVariant("onnxruntime-qat", "onnxruntime", "qat-qdq", "int8", counterpart=REFERENCE,
                                retrained=True))


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model: str | Path, threads: int | None = None, precision: str = "fp32",
                 providers: list[str] | None = None, device: str = "cpu"):
        import onnxruntime as ort

        super().__init__(precision)
        self.path = Path(model)
        self.threads = threads or physical_cores()
        opts = ort.SessionOptions()
        # intra-op threads = physical cores; inter-op 1: a CNN graph is a chain, and more threads
        # than cores only adds contention (and oversubscribes when the server runs workers too).
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.provider_reason = "providers given by the caller"
        if providers is None:
            providers, self.provider_reason = select_providers(device, available_providers())
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        if self.session.get_providers()[0] != providers[0]:  # e.g. CUDA EP present but no driver/GPU
            self.provider_reason = (f"{providers[0]} failed to initialise, fell back to "
                                    f"{self.session.get_providers()[0]}")
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version, "threads": self.threads,
                "providers": self.session.get_providers(), "provider_reason": self.provider_reason,
                "model": self.path.name}
