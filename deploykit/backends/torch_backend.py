"""PyTorch eager (optionally torch.compile) backend: the reference every other runtime is compared to."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BACKENDS, Backend, missing_module, physical_cores


@BACKENDS.register("torch")
class TorchBackend(Backend):
    name = "torch"
    packages = ("torch",)
    reads = ("module",)  # an nn.Module (bench loads it from the artifact's source checkpoint)
    bench_modes = {"torch-compile": {"compile": True}}  # opt-in: its first compile per shape can take minutes

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        return missing_module("torch", "pip install torch")

    def __init__(self, model, threads: int | None = None, precision: str = "fp32", compile: bool = False):
        import torch

        super().__init__(precision)
        self.threads = threads or physical_cores()
        torch.set_num_threads(self.threads)
        self.model = model.eval()
        self.compiled = compile
        self._fn = torch.compile(self.model) if compile else self.model
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if self._dtype is None:
                return self._fn(t).float().numpy()
            with torch.autocast("cpu", dtype=self._dtype):
                return self._fn(t).float().numpy()

    def info(self) -> dict[str, Any]:
        import torch

        return {**super().info(), "version": torch.__version__, "threads": self.threads, "compile": self.compiled}
