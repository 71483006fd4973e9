"""The Stage base class, the state passed from stage to stage, and the stage registry.

A stage reads the typed fields earlier stages left in ``PipelineState`` (a torch model, an ONNX path, the
model files runtime selection chooses among), writes its outputs into the artifact's work directory and
returns a dict of facts for the report. Facts are for people only: no stage reads another stage's facts.

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
from typing import ClassVar

from .config import StageConfig
from ..registry import Registry
from .state import PipelineState, QuantSettings, RuntimeCandidate, RuntimeChoice, StageInputs

STAGES: Registry[type["Stage"]] = Registry("stage", package="deploykit.stages", skip=("base", "config", "state"))


class Stage(ABC):
    """One pipeline step. Subclasses define ``Config`` (a StageConfig) and ``run``."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def run(self, state: PipelineState) -> dict:
        """Do the work; return JSON-able facts for the report (parity numbers, sizes, choices)."""

    def preflight(self, model) -> None:
        """Refuse, with a DeployKitError, a model this stage cannot handle; cheap (no data, no pruning or
        export). ``compress`` calls it for every stage right after loading the model, before any stage runs."""


def register(name: str):
    """Register a Stage subclass under ``name`` and set its ``name`` attribute."""

    def deco(cls):
        cls.name = name
        return STAGES.register(name)(cls)

    return deco
