"""The Backend interface and its registry. Heavy runtimes are imported only by their own module."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..registry import Registry

BACKENDS: Registry[type["Backend"]] = Registry(
    "backend",
    modules=(
        "deploykit.backends.torch_backend",
        "deploykit.backends.onnxruntime_backend",
        "deploykit.backends.openvino_backend",
        "deploykit.backends.tensorrt_backend",
    ),
)


def physical_cores() -> int:
    """Physical cores (not hyper-threads): the thread count that avoids oversubscription."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    return os.cpu_count() or 1


class Backend(ABC):
    """A loaded model on one runtime. ``run`` takes float32 NCHW and returns float32 logits."""

    name: str = "?"

    def __init__(self, precision: str = "fp32"):
        self.precision = precision

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]:
        """Runtime name, version and settings, recorded next to every number measured with it."""
        return {"backend": self.name, "precision": self.precision}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info()})"


def create_backend(name: str, model: Any, **settings: Any) -> Backend:
    """Instantiate a registered backend: ``model`` is a path (ONNX/IR/engine) or an nn.Module (torch)."""
    return BACKENDS.get(name)(model, **settings)
