"""TensorRT engine runner behind the Backend interface (TensorRT 10 name-based I/O API).

Given an artifact's ``model.onnx`` (or a ``model.engine``), it reads ``engine.json`` first and refuses an
engine built for another TensorRT version or GPU *before* deserializing it (or rebuilds it from the
stored ONNX with ``rebuild_on_mismatch=True``). Device memory is handled with torch CUDA tensors, so no
pycuda/cuda-python is needed; ``execute_async_v3`` runs on torch's current stream.

Status: written to the TensorRT 10 Python API documentation and NEVER executed (no GPU, no TensorRT here;
see docs/gpu.md). The engine.json checks it calls first were executed and tested.

Engine building, ``engine.json`` and the GPU environment are in ``tensorrt_engine`` beside this module; the
``deploykit doctor`` lines for the GPU stack (cuda, tensorrt, torch-tensorrt) are here.

Example:
    >>> be = create_backend("tensorrt", "a.deploykit/model.onnx")   # uses a.deploykit/model.engine
    >>> be.run(np.zeros((4, 1, 28, 28), np.float32)).shape
    (4, 10)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..doctor import Check, installed_version
from ..errors import DeployKitError
from .base import BACKENDS, Backend
from .tensorrt_engine import ENGINE_FILE, TRT_INSTALL_FIX, ensure_engine, gpu_environment, tensorrt_status


def check_cuda() -> Check:
    env = gpu_environment()
    torch_cuda, torch_avail = None, False
    try:
        import torch

        torch_cuda, torch_avail = torch.version.cuda, bool(torch.cuda.is_available())
    except Exception:
        pass
    extra = {**env, "torch_cuda_build": torch_cuda, "torch_cuda_available": torch_avail}
    if env["gpu"]:
        return Check("cuda", True, env["driver"], f"GPU {env['gpu']} (compute capability {env['compute_capability']}), "
                     f"driver {env['driver']}; torch CUDA build {torch_cuda}, torch sees GPU: {torch_avail}", extra=extra)
    return Check("cuda", False, None, f"torch CUDA build {torch_cuda}, torch sees GPU: {torch_avail}",
                 why=f"no NVIDIA GPU/driver visible ({env['gpu_error']})",
                 fix="run on a machine with an NVIDIA GPU and its driver (nvidia-smi must work)", extra=extra)


def check_tensorrt() -> Check:
    version, why = tensorrt_status()
    if version:
        return Check("tensorrt", True, version, "deploykit build-engine and the `tensorrt` backend can run")
    return Check("tensorrt", False, None, why=why, fix=TRT_INSTALL_FIX)


def check_torch_tensorrt() -> Check:
    v = installed_version("torch-tensorrt") or installed_version("torch_tensorrt")
    if v:
        return Check("torch-tensorrt", True, v, "optional PyTorch-side compile path")
    return Check("torch-tensorrt", False, None, why="not installed (optional; needs TensorRT and a CUDA torch)",
                 fix="pip install torch-tensorrt matching your torch version, on a machine with TensorRT")


@BACKENDS.register("tensorrt")
class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "gpu"
    packages = ("tensorrt",)
    reads = (".onnx", ".engine", ".plan")  # an ONNX means the engine built beside it (ENGINE_FILE)

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        try:
            version, why = tensorrt_status()
            if version is None:
                return why
            env = gpu_environment()
            return None if env["gpu"] else f"TensorRT {version} is installed but no NVIDIA GPU is visible ({env['gpu_error']})"
        except Exception as err:  # never raises: a broken stack is a reason, not a crash
            return f"TensorRT check failed: {type(err).__name__}: {err}"

    @classmethod
    def doctor_checks(cls):
        return (check_cuda, check_tensorrt, check_torch_tensorrt)

    def __init__(self, model: str | Path, threads: int | None = None, precision: str = "fp32",
                 rebuild_on_mismatch: bool = False, device: int | str = 0, **_ignored: Any):
        super().__init__(precision)
        path = Path(model)
        self.engine_path = path if path.suffix in (".engine", ".plan") else path.parent / ENGINE_FILE
        # The version/GPU check happens here, before any TensorRT call: deserializing a foreign engine
        # fails late with an opaque "serialization assertion" message.
        self.meta = ensure_engine(self.engine_path, rebuild_on_mismatch=rebuild_on_mismatch)
        import tensorrt as trt
        import torch

        self._torch = torch
        self.device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise DeployKitError(f"TensorRT could not deserialize {self.engine_path}",
                                 fix=f"rebuild it: `deploykit build-engine {self.engine_path.parent}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: self._torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=self.device)
        self.version = trt.__version__
        self.max_batch = int(self.meta.get("batch", {}).get("max", 0)) or None

    def _torch_dtype(self, trt, dt):
        t = self._torch
        return {trt.float32: t.float32, trt.float16: t.float16, trt.int8: t.int8, trt.int32: t.int32,
                trt.bool: t.bool}.get(dt, t.float32)

    def _enqueue(self, x_dev) -> Any:
        """Bind ``x_dev`` (a CUDA tensor) and queue one inference on self.stream; returns the output tensor."""
        torch = self._torch
        inp, out = self.inputs[0], self.outputs[0]
        self.context.set_input_shape(inp, tuple(x_dev.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self._dtypes[out], device=self.device)
        self.context.set_tensor_address(inp, x_dev.data_ptr())
        self.context.set_tensor_address(out, y.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return y

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.max_batch and len(x) > self.max_batch:
            raise DeployKitError(f"batch {len(x)} exceeds the engine's profile maximum {self.max_batch}",
                                 fix="rebuild with `deploykit build-engine ARTIFACT --max-batch N`")
        torch = self._torch
        with torch.cuda.stream(self.stream):
            x_dev = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(
                self.device, non_blocking=False).to(self._dtypes[self.inputs[0]])
            y = self._enqueue(x_dev)
        self.stream.synchronize()
        return y.float().cpu().numpy()

    def device_latency_ms(self, x: np.ndarray, runs: int = 200, warmup: int = 20, cuda_graph: bool = True) -> dict:
        """GPU-side latency with CUDA events (input already on the device), median and p90 over ``runs``.

        With ``cuda_graph`` the enqueue is captured once into a CUDA graph and replayed, which removes
        per-launch CPU overhead at small batch sizes (TensorRT supports capture after one warm-up run).
        """
        torch = self._torch
        with torch.cuda.stream(self.stream):
            x_dev = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device).to(
                self._dtypes[self.inputs[0]])
            for _ in range(max(1, warmup)):
                self._enqueue(x_dev)
            self.stream.synchronize()
            launch = lambda: self._enqueue(x_dev)  # noqa: E731
            if cuda_graph:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue(x_dev)
                launch = graph.replay
            times = []
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                launch()
                end.record(self.stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
        t = np.sort(np.asarray(times))
        return {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90)), "runs": runs,
                "batch": int(len(x)), "cuda_graph": cuda_graph,
                "throughput_ips": float(len(x) * 1000.0 / np.median(t))}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version, "engine": self.engine_path.name,
                "gpu": self.meta.get("gpu"), "built_precision": self.meta.get("precision"),
                "batch_profile": self.meta.get("batch")}
