"""Runtimes behind one interface: ``backend.run(x) -> logits`` on float32 NCHW numpy arrays.

Evaluation, benchmarks and the service all go through here, so a model is measured exactly the way
it is served.

Example:
    >>> be = create_backend("onnxruntime", "model.onnx", threads=2)
    >>> be.run(np.zeros((1, 1, 28, 28), np.float32)).shape
    (1, 10)
"""

from __future__ import annotations

from .base import BACKENDS, Backend, create_backend, physical_cores, run_batched

__all__ = ["BACKENDS", "Backend", "create_backend", "physical_cores", "run_batched"]
