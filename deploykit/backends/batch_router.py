"""Serve each batch on the runtime measured fastest at the nearest timed batch size.

select_runtime with ``objective: per_batch`` ships one runtime per timed batch size when they differ by more
than a tie. Why: which runtime is fastest depends on the batch size. On the 64x64 ResNet-10-T pruned to 0.42x
(Intel Xeon, 2 cores, AMX), ONNX Runtime INT8 ran one image in 0.41 ms against OpenVINO INT8's 0.81 ms, while
OpenVINO INT8 ran a batch of 32 in 6.4 ms against ONNX Runtime's 7.7 ms. One runtime for both sizes gives up about
half the speed at one of them.

A batch of n images goes to the timed size nearest n on a log scale (ties to the larger): with sizes 1 and 32,
batches of up to 5 go to the batch-1 runtime and batches of 6 or more to the batch-32 one. Sizes between the timed
ones were not measured.

Example:
    >>> router = BatchRouter({1: create_backend("onnxruntime", "model.int8.onnx"),
    ...                       32: create_backend("openvino", "model.ov.xml", precision="int8")})
    >>> router.route(4), router.route(8)
    (1, 32)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .base import Backend


def nearest_batch(sizes, n: int) -> int:
    """The timed batch size (of ``sizes``) whose runtime serves a batch of ``n``: nearest in log2, ties to the larger.

    Example:
        >>> nearest_batch([1, 32], 5), nearest_batch([1, 32], 6)
        (1, 32)
    """
    return min(sizes, key=lambda bs: (abs(math.log2(bs) - math.log2(max(n, 1))), -bs))


def route_settings(route: dict, routes: dict) -> dict:
    """A route's backend settings in a router: ONNX Runtime's idle workers stop spinning when another runtime
    shares the process. Measured (ResNet-10-T INT8, one bs1 call on ONNX Runtime then one bs32 call on OpenVINO,
    alternating): OpenVINO's call took 10.9 ms after a spinning ONNX Runtime and 8.1 ms after a quiet one, 8.8 ms
    alone; spinning off cost ONNX Runtime 0.31 -> 0.37 ms at bs1 alone."""
    mixed = len({r["backend"] for r in routes.values()}) > 1
    return {**route["settings"], **({"spinning": False} if mixed and route["backend"] == "onnxruntime" else {})}


class BatchRouter(Backend):
    """Several loaded backends of the same model, each serving the batch sizes nearest its timed one."""

    name = "by-batch"

    def __init__(self, routes: dict[int, Backend]):
        if not routes:
            raise ValueError("BatchRouter needs at least one route")
        self.routes = dict(sorted(routes.items()))
        precisions = sorted({be.precision for be in self.routes.values()})
        super().__init__("+".join(precisions))
        self.threads = max(getattr(be, "threads", 1) or 1 for be in self.routes.values())

    @classmethod
    def from_routes(cls, routes: dict, load: Callable[[dict, dict], Backend]) -> "BatchRouter":
        """The router over ``routes`` ({timed batch size: the manifest's route dict}); ``load(route, settings)``
        opens one route's model with ``route_settings`` applied (Artifact.backend() and the report build it so)."""
        return cls({int(bs): load(r, route_settings(r, routes)) for bs, r in routes.items()})

    def route(self, n: int) -> int:
        """The timed batch size whose runtime serves a batch of ``n`` (``nearest_batch``)."""
        return nearest_batch(self.routes, n)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.routes[self.route(len(x))].run(x)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "threads": self.threads,
                "routes": {f"bs{bs}": be.info() for bs, be in self.routes.items()}}
