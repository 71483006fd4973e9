"""The Stage base class, the state passed from stage to stage, and the stage registry.

A stage reads what earlier stages left in ``PipelineState`` (a torch model, an ONNX path), writes
its outputs into the artifact's work directory, and returns a dict of facts for the report.

Example:
    >>> @STAGES.register("noop")
    ... class Noop(Stage):
    ...     class Config(StageConfig):
    ...         pass
    ...     def run(self, state):
    ...         return {}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..recipe import StageConfig
from ..registry import Registry

STAGES: Registry[type["Stage"]] = Registry(
    "stage",
    modules=(
        "deploykit.stages.fuse_bn",
        "deploykit.stages.export_onnx",
        "deploykit.stages.quantize_onnx",
        "deploykit.stages.cast_onnx",
        "deploykit.stages.quantize_tensorrt",
        "deploykit.stages.build_engine",
        "deploykit.stages.quantize_openvino",
        "deploykit.stages.select_runtime",
        "deploykit.stages.prune",
        "deploykit.stages.distill",
        "deploykit.stages.accuracy_guard",
        "deploykit.stages.static_pad",
        "deploykit.stages.qat",
    ),
)


@dataclass
class PipelineState:
    """Everything a stage may read or replace. Data flows one way: stages never touch earlier outputs."""

    model: Any                       # the current torch.nn.Module (fused, pruned, fine-tuned...)
    teacher: Any                     # the original model, untouched: KD teacher and accuracy reference
    preprocessing: Any               # deploykit.preprocessing.Preprocessing
    workdir: Path                    # the artifact directory being built (renamed into place at the end)
    data: Any = None                 # deploykit.data.DataSplits, or None on the data-free path
    target: str = "cpu"
    onnx_path: Path | None = None        # the latest ONNX model
    onnx_fp32_path: Path | None = None   # the float ONNX every later ONNX is checked against
    precision: str = "fp32"
    runtime: dict = field(default_factory=lambda: {"backend": "onnxruntime", "settings": {}})
    calibration_fn: Callable[[], np.ndarray] | None = None   # lazily built calibration inputs
    check_fn: Callable[[], np.ndarray] | None = None         # lazily built inputs for parity checks
    log: Callable[[str], None] = print
    facts: dict = field(default_factory=dict)   # anything stages want in the report, by stage name
    _cache: dict = field(default_factory=dict)

    def calibration_inputs(self) -> np.ndarray:
        """Preprocessed calibration images (real, or synthesized from BN statistics when data-free)."""
        if "calibration" not in self._cache:
            self._cache["calibration"] = self.calibration_fn()
        return self._cache["calibration"]

    def check_inputs(self) -> np.ndarray:
        """Inputs for parity checks: held-out real images, or held-out synthetic ones."""
        if "check" not in self._cache:
            self._cache["check"] = self.check_fn()
        return self._cache["check"]


class Stage(ABC):
    """One pipeline step. Subclasses define ``Config`` (a StageConfig) and ``run``."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def run(self, state: PipelineState) -> dict:
        """Do the work; return JSON-able facts for the report (parity numbers, sizes, choices)."""


def register(name: str):
    """Register a Stage subclass under ``name`` and set its ``name`` attribute."""

    def deco(cls):
        cls.name = name
        return STAGES.register(name)(cls)

    return deco
