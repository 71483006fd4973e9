"""PyTorch on an NVIDIA GPU: the compressed float model in fp16/bf16, channels_last, torch.compile + CUDA graphs.

The model is the artifact's ``model.torch.pth`` (written by the ``export_torch`` stage: fused, pruned, distilled;
``deploykit.torch_model_io``), or an ``nn.Module`` handed in directly. Its weights are cast to the precision
(fp16/bf16: the whole network runs in that type, as on the GPU; fp32 runs with TF32 off, IEEE float32), laid out
channels_last (tensor-core convolution kernels want NHWC), and on CUDA compiled with ``torch.compile``; with
``cuda_graphs`` the compiled model replays a CUDA graph per batch shape (``mode="reduce-overhead"``: CUDA-graph
trees), which removes per-kernel launch overhead at small batches. Inputs go host -> pinned host buffer -> device
(asynchronous copy), logits come back through a pinned buffer the same way.

The device is a setting: ``device="cpu"`` runs the same code on the CPU (eager, no graphs, no pinned memory), so
the precision handling, the rebuild of the model and the selection logic are tested on machines without a GPU.
Artifacts whose target is ``gpu`` choose this runtime when torch sees a GPU (``gpu_artifact_backend``); elsewhere
they run their ONNX model on ONNX Runtime (TensorRT / CUDA execution providers where onnxruntime-gpu is
installed, else the CPU). The ``tensorrt`` backend stays an alternative by name.

Status: the CPU path runs in the tests. The CUDA path (pinned buffers, non-blocking copies, torch.compile with
inductor, CUDA-graph replay, TF32 switches) was written to the torch documentation and has NOT yet run on a GPU
(docs/gpu.md).

Example:
    >>> be = create_backend("torch-cuda", "a.deploykit/model.torch.pth", precision="fp16")   # cuda when present
    >>> be.run(np.zeros((8, 1, 28, 28), np.float32)).shape
    (8, 10)
    >>> create_backend("torch-cuda", path, precision="bf16", device="cpu").info()["device"]
    'cpu'
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..doctor import Check
from ..errors import DeployKitError
from .base import BACKENDS, Backend, missing_module

NAME = "torch-cuda"
PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile keeps one compiled graph per guard set and falls back to eager past torch._dynamo.config's
# recompile limit (8): a batch sweep 1..1024 is 11 shapes, so the limit is raised for this runtime.
RECOMPILE_LIMIT = 64


def gpu_artifact_backend(runtime: dict, cuda_available: bool | None = None) -> tuple[str, dict]:
    """The runtime (and extra settings) an artifact runs on here, by its target.

    A ``target: gpu`` artifact runs on ``torch-cuda`` when torch sees a GPU; otherwise on ONNX Runtime with
    ``device: gpu`` (its TensorRT / CUDA execution providers where onnxruntime-gpu is installed, else the CPU)
    over the artifact's ONNX model. Any other target runs on the runtime its manifest names.

    Example:
        >>> gpu_artifact_backend({"backend": "torch-cuda", "target": "gpu", "precision": "fp16"}, cuda_available=False)
        ('onnxruntime', {'device': 'gpu', 'precision': 'fp16'})
    """
    if runtime.get("target") != "gpu":
        return runtime["backend"], {}
    if cuda_available is None:
        from ..gpu import cuda_unavailable

        cuda_available = cuda_unavailable() is None
    if cuda_available:
        return NAME, {}
    # ONNX Runtime has no bf16 convolutions: a bf16 artifact's ONNX model is its FP32 export
    return "onnxruntime", {"device": "gpu", "precision": "fp32" if runtime.get("precision") == "bf16" else
                           runtime.get("precision", "fp32")}


def check_torch_cuda() -> Check:
    from ..gpu import CUDA_FIX, cuda_unavailable, gpu_machine_line

    why = cuda_unavailable()
    if why is None:
        return Check(NAME, True, None, f"{gpu_machine_line()}: `target: gpu` artifacts run on torch-cuda")
    return Check(NAME, False, None, why=why, fix=CUDA_FIX)


def _ieee_fp32(torch) -> None:
    """FP32 means IEEE float32 here: cuDNN convolutions default to TF32 on Ampere and later (10-bit mantissa).

    The legacy switches are used: mixing them with the newer ``fp32_precision`` API makes the legacy getters
    raise (seen with torch 2.14), and other code in the process may still read them."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _raise_recompile_limit(torch) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older torch has the second
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), RECOMPILE_LIMIT))
            return


@BACKENDS.register(NAME)
class TorchCudaBackend(Backend):
    name = NAME
    device = "gpu"
    packages = ("torch", "triton")
    reads = (".pth",)  # the artifact's model.torch.pth (an nn.Module is accepted too, e.g. timm with random weights)
    # opt-in bench names: the same runtime without CUDA graphs, without compile, and on the CPU (tests, dry runs)
    bench_modes = {"torch-cuda-compile": {"cuda_graphs": False}, "torch-cuda-eager": {"compile": False},
                   "torch-cuda-cpu": {"device": "cpu"}}
    bench_precisions = PRECISIONS

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        missing = missing_module("torch", "pip install torch (a CUDA build for GPUs)")
        if missing or settings.get("device", "auto") == "cpu":
            return missing
        from ..gpu import cuda_unavailable

        return cuda_unavailable()

    @classmethod
    def doctor_checks(cls):
        return (check_torch_cuda,)

    def __init__(self, model, threads: int | None = None, precision: str = "fp16", device: str = "auto",
                 compile: bool | None = None, cuda_graphs: bool | None = None, channels_last: bool = True,
                 compile_backend: str = "inductor", dynamic: bool | None = None, cudnn_benchmark: bool = True,
                 **_ignored: Any):
        """Args:
            model: a ``model.torch.pth`` path or an ``nn.Module`` (copied, never changed).
            device: 'auto' (cuda where torch sees a GPU, else cpu), 'cpu', 'cuda' or 'cuda:N'.
            compile: torch.compile the model; None = on CUDA only (inductor on a CPU compiles C++ for minutes).
            cuda_graphs: replay CUDA graphs (torch.compile mode 'reduce-overhead'); None = on CUDA when compiling.
            compile_backend: torch.compile's backend; 'eager' traces with dynamo only (the CPU dry runs use it).
            dynamic: torch.compile's ``dynamic``: None = a static graph for the first batch size, one dynamic-batch
                graph from the second on (two compiles); True = dynamic from the start (one compile: sweeps);
                False = a graph per batch size (fastest kernels for one fixed batch).
            cudnn_benchmark: on CUDA, let cuDNN time its convolution algorithms on the first call of each input
                shape (process-wide ``torch.backends.cudnn.benchmark``); that first call is a warm-up anyway.
        """
        import torch

        from ..gpu import resolve_device

        if precision not in PRECISIONS:
            raise DeployKitError(f"torch-cuda precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                                 fix="use precision fp16, bf16 or fp32")
        super().__init__(precision)
        self._torch = torch
        self.torch_device = torch.device(resolve_device(device))
        self.on_cuda = self.torch_device.type == "cuda"
        self.threads = None
        if not self.on_cuda and threads:
            torch.set_num_threads(threads)
            self.threads = threads
        self.compiled = self.on_cuda if compile is None else bool(compile)
        self.cuda_graphs = (self.on_cuda and self.compiled) if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not self.on_cuda:
            raise DeployKitError(f"cuda_graphs needs a CUDA device, this backend runs on {self.torch_device}",
                                 fix="drop cuda_graphs, or run with device cuda on a GPU machine")
        if self.cuda_graphs and not self.compiled:
            raise DeployKitError("cuda_graphs are replayed through torch.compile(mode='reduce-overhead'), and "
                                 "compile is off", fix="set compile true, or cuda_graphs false")
        self.source = Path(model).name if not isinstance(model, torch.nn.Module) else type(model).__name__
        if isinstance(model, torch.nn.Module):
            module = copy.deepcopy(model).eval()
        else:
            from ..torch_model_io import load_torch_model

            module = load_torch_model(model)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if precision == "fp32" and self.on_cuda:
            _ieee_fp32(torch)
        if self.on_cuda and cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.channels_last = channels_last
        module = module.to(device=self.torch_device, dtype=self.dtype)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.model = module
        self.compile_backend = compile_backend if self.compiled else None
        self.dynamic = dynamic if self.compiled else None
        if self.compiled:
            _raise_recompile_limit(torch)
            kw = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
            self._fn = torch.compile(module, backend=compile_backend, dynamic=dynamic, **kw)
        else:
            self._fn = module
        self._host_in = None   # pinned host staging buffers, grown on demand (CUDA only)
        self._host_out = None

    # --- staging -------------------------------------------------------------------------------------------------

    def _pinned(self, current, shape: tuple[int, ...]):
        """A pinned float32 host buffer holding at least ``shape`` (reused across calls; grown when too small)."""
        torch = self._torch
        if current is None or current.shape[1:] != shape[1:] or current.shape[0] < shape[0]:
            current = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return current

    def to_device(self, x: np.ndarray):
        """``x`` (float32 NCHW) on this backend's device, in its precision and memory layout."""
        torch = self._torch
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.on_cuda:
            self._host_in = self._pinned(self._host_in, x.shape)
            staged = self._host_in[: len(x)]
            np.copyto(staged.numpy(), x)
            t = staged.to(self.torch_device, non_blocking=True)
        else:
            t = torch.from_numpy(x)
        t = t.to(self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    def forward(self, t):
        """One model call on a tensor already on the device (no copies, no synchronisation)."""
        if self.cuda_graphs:
            # a new CUDA-graph-tree iteration: the previous call's outputs may be overwritten from here on
            self._torch.compiler.cudagraph_mark_step_begin()
        return self._fn(t)

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self.forward(self.to_device(x)).float()
            if not self.on_cuda:
                return y.numpy()
            self._host_out = self._pinned(self._host_out, tuple(y.shape))
            out = self._host_out[: len(y)]
            out.copy_(y, non_blocking=True)
            torch.cuda.current_stream(self.torch_device).synchronize()
            return out.numpy().copy()  # the pinned buffer is reused by the next call

    def resident(self, x: np.ndarray) -> Callable[[Any], Any]:
        """A call that runs the model on ``x`` already staged on the device: throughput without the copies.

        The returned function ignores its argument (so ``deploykit.measure`` can time it like ``run``) and does not
        synchronise: time it with the 'cuda' clock (CUDA events), which waits for the GPU.

        Example:
            >>> fn = backend.resident(x)
            >>> time_variants({"resnet50": fn}, x, clock="cuda")
        """
        torch = self._torch
        t = self.to_device(x)
        if self.on_cuda:  # the pinned staging buffer is reused: the copy must be done before anyone refills it
            torch.cuda.current_stream(self.torch_device).synchronize()

        def call(_ignored=None):
            with torch.inference_mode():
                return self.forward(t)

        return call

    def info(self) -> dict[str, Any]:
        torch = self._torch
        out = {**super().info(), "version": torch.__version__, "device": str(self.torch_device),
               "compile": self.compiled, "compile_backend": self.compile_backend, "dynamic": self.dynamic,
               "cuda_graphs": self.cuda_graphs,
               "channels_last": self.channels_last, "pinned_staging": self.on_cuda, "model": self.source,
               "threads": self.threads}
        if self.on_cuda:
            out["gpu"] = torch.cuda.get_device_name(self.torch_device)
            out["fp32_math"] = "ieee (TF32 off)" if self.precision == "fp32" else None
        return out
