"""The Backend interface and its registry. Heavy runtimes are imported only by their own module.

A backend module holds everything about its runtime: the Backend class (registered in ``BACKENDS``), the
runtime variants it offers (``deploykit.variants``), the packages whose versions decide its numbers and its
``deploykit doctor`` checks. Adding a runtime is adding one module here (plus its test).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import numpy as np

from ..registry import Registry

BACKENDS: Registry[type["Backend"]] = Registry("backend", package="deploykit.backends", skip=("base",))


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

    name: ClassVar[str] = "?"
    # where it runs: "cpu" backends are measured by select_runtime and bench on any machine; "gpu" ones need a GPU
    device: ClassVar[str] = "cpu"
    # distributions whose versions decide this runtime's numbers (recorded in manifests, shown by doctor)
    packages: ClassVar[tuple[str, ...]] = ()
    # what ``create_backend``'s model may be: "module" (a torch nn.Module) or model-file suffixes (".onnx", ".xml")
    reads: ClassVar[tuple[str, ...]] = ()
    # further names `deploykit bench --backends` accepts for this runtime, with the settings they add (opt-in:
    # never in the default list), e.g. {"torch-compile": {"compile": True}}; a "device" setting other than
    # "cpu" makes it a GPU variant
    bench_modes: ClassVar[dict[str, dict[str, Any]]] = {}
    # precisions `deploykit bench` runs a backend that reads the artifact's torch model (model.torch.pth) at
    bench_precisions: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def unavailable(cls, **settings: Any) -> str | None:
        """Why this backend (with these constructor settings) cannot run on this machine, or None. Never raises."""
        return None

    @classmethod
    def doctor_checks(cls) -> tuple[Callable[[], Any], ...]:
        """Functions returning ``deploykit.doctor.Check`` lines for this runtime (``deploykit doctor``)."""
        return ()

    def __init__(self, precision: str = "fp32"):
        self.precision = precision

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]:
        """Runtime name, version and settings, recorded next to every number measured with it."""
        return {"backend": self.name, "precision": self.precision}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info()})"


def run_batched(run, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """``run`` (a Backend's ``run``, or any array -> logits callable) over ``x`` in batches, concatenated.

    Example:
        >>> run_batched(create_backend("onnxruntime", "model.onnx").run, x)
    """
    from ..stop import check_stop

    out = []
    for i in range(0, len(x), batch):
        check_stop()
        out.append(run(x[i:i + batch]))
    return np.concatenate(out)


def missing_module(module: str, install: str) -> str | None:
    """Why ``module`` cannot be imported here (without importing it), or None: for ``Backend.unavailable``."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as err:  # a broken install is a reason, not a crash
        return f"{module} cannot be looked up: {type(err).__name__}: {err}"
    return None if found else f"{module} is not installed ({install})"


def create_backend(name: str, model: Any, **settings: Any) -> Backend:
    """Instantiate a registered backend: ``model`` is a path (ONNX/IR/engine) or an nn.Module (torch)."""
    return BACKENDS.get(name)(model, **settings)
