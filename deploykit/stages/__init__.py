"""Pipeline stages. Each is one class with a typed config, registered by name in ``STAGES``.

Stage modules import torch/onnx only inside ``run``, so listing or validating a recipe stays light.
"""

from __future__ import annotations

from .base import STAGES, PipelineState, Stage
from .state import QuantSettings, RuntimeCandidate, RuntimeChoice, StageInputs

__all__ = ["STAGES", "PipelineState", "QuantSettings", "RuntimeCandidate", "RuntimeChoice", "Stage", "StageInputs"]
