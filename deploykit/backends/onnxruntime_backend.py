"""ONNX Runtime backend (CPU here; CUDA/TensorRT execution providers when onnxruntime-gpu and a GPU exist)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..doctor import Check, installed_version
from ..variants import REFERENCE, RuntimeVariant, register_variant
from .base import BACKENDS, Backend, missing_module, physical_cores

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


def check_onnxruntime() -> Check:
    cpu, gpu = installed_version("onnxruntime"), installed_version("onnxruntime-gpu")
    try:
        import onnxruntime as ort
    except Exception as err:
        return Check("onnxruntime", False, cpu or gpu, why=f"does not import ({err})",
                     fix="pip install onnxruntime (CPU) or onnxruntime-gpu (NVIDIA), never both")
    providers = list(ort.get_available_providers())
    detail = f"providers: {', '.join(providers)}"
    if cpu and gpu:
        return Check("onnxruntime", False, ort.__version__, detail,
                     why=f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed: they overwrite each "
                         "other's files in the same `onnxruntime` module",
                     fix="pip uninstall -y onnxruntime onnxruntime-gpu, then install exactly one of them",
                     extra={"providers": providers})
    return Check("onnxruntime", True, ort.__version__, detail + f" (package {'onnxruntime-gpu' if gpu else 'onnxruntime'})",
                 extra={"providers": providers})


def check_onnxruntime_gpu() -> Check:
    try:
        providers = available_providers()
    except Exception:
        providers = []
    gpu = [p for p in GPU_PROVIDERS if p in providers]
    if gpu:
        return Check("onnxruntime GPU providers", True, installed_version("onnxruntime-gpu"), ", ".join(gpu) +
                     " offered (they still need a CUDA driver and GPU at session creation)")
    return Check("onnxruntime GPU providers", False, None,
                 why="the installed onnxruntime package is the CPU build: no CUDA/TensorRT execution providers",
                 fix="in a separate environment: pip install onnxruntime-gpu (it replaces onnxruntime; "
                     "the `gpu` extra of deploykit)")


# No bf16 variant: ONNX Runtime CPU has no bf16 Conv kernels (bf16 runs on OpenVINO).
register_variant(RuntimeVariant(REFERENCE, "onnxruntime", "fp32-onnx", "fp32"))
register_variant(RuntimeVariant("onnxruntime-int8", "onnxruntime", "int8-qdq", "int8", counterpart=REFERENCE))
register_variant(RuntimeVariant("onnxruntime-qat", "onnxruntime", "qat-qdq", "int8", counterpart=REFERENCE,
                                retrained=True))


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    packages = ("onnxruntime", "onnxruntime-gpu")
    reads = (".onnx",)
    bench_modes = {"onnxruntime-cuda": {"device": "gpu"}}  # GPU execution providers (onnxruntime-gpu)

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        try:
            missing = missing_module("onnxruntime", "pip install onnxruntime")
            if missing:
                return missing
            if settings.get("device", "cpu") == "cpu":
                return None
            if not os.path.exists("/dev/nvidia0"):
                return "no NVIDIA GPU on this machine (/dev/nvidia0 is missing)"
            if "CUDAExecutionProvider" not in available_providers():
                return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
            return None
        except Exception as err:  # never raises: a broken install is a reason, not a crash
            return f"onnxruntime does not load: {type(err).__name__}: {err}"

    @classmethod
    def doctor_checks(cls):
        return (check_onnxruntime, check_onnxruntime_gpu)

    def __init__(self, model: str | Path, threads: int | None = None, precision: str = "fp32",
                 providers: list[str] | None = None, device: str = "cpu", spinning: bool = True):
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
        # spinning: idle workers keep polling after a call (faster next call: ResNet-10-T INT8 bs1 0.31 vs 0.37 ms)
        # but hold the cores meanwhile; off where another runtime shares the process (BatchRouter)
        self.spinning = spinning
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
                "model": self.path.name, "spinning": self.spinning}
