"""Runtime variants: one model file on one backend at one precision, the candidates runtime selection measures.

A stage that writes a model records it in the pipeline state under a ``ModelKind``; every registered variant
whose model kind exists becomes a candidate. Backends declare their variants in their own module (beside
the Backend class), so adding a runtime is one module: select_runtime, bench, the CLI help and the tests read
this registry.

Example:
    >>> [v.name for _, v in RUNTIME_VARIANTS.items() if v.model == "int8-qdq"]
    ['onnxruntime-int8', 'openvino-qdq']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .registry import Registry

# What a stage can produce. Each maps to one typed entry of the pipeline state's ``models``.
ModelKind = Literal[
    "fp32-onnx",           # export_onnx: the float reference every later model is checked against
    "int8-qdq",            # quantize_onnx (or accuracy_guard's repaired version of it): QDQ ONNX
    "openvino-int8",       # quantize_openvino: NNCF INT8, its primary format (IR or ONNX)
    "openvino-int8-onnx",  # quantize_openvino with format=both: NNCF's Q/DQ ONNX beside the IR
    "qat-qdq",             # qat: the fine-tuned QDQ ONNX
]

REFERENCE = "onnxruntime-fp32"  # every candidate's latency score is relative to this one


@dataclass(frozen=True)
class RuntimeVariant:
    """One candidate: the backend that runs it, the model kind it needs, and the FP32 variant it must beat.

    Args:
        name: unique, ``<backend>-<what>`` by convention.
        backend: a name in ``deploykit.backends.BACKENDS``.
        model: the ModelKind whose file it runs; the variant exists only when a stage wrote that file.
        precision: what the runtime computes in ("fp32", "bf16", "int8", ...).
        counterpart: the FP32 variant it must beat to be worth shipping (None: it is a float reference).
        settings: backend keyword settings (e.g. OpenVINO's performance hint).
        retrained: the model was fine-tuned (QAT), so it is judged on accuracy, not agreement with FP32.
        needs: a CPU capability it only makes sense with ("bf16"); selection asks the CPU (or the recipe).
    """

    name: str
    backend: str
    model: ModelKind
    precision: str
    counterpart: str | None = None
    settings: dict = field(default_factory=dict)
    retrained: bool = False
    needs: Literal["bf16"] | None = None


# Backend modules register their variants when the registry first loads them.
RUNTIME_VARIANTS: Registry[RuntimeVariant] = Registry("runtime variant", package="deploykit.backends",
                                                      skip=("base",))


def register_variant(variant: RuntimeVariant) -> RuntimeVariant:
    return RUNTIME_VARIANTS.register(variant.name)(variant)


def variant_names() -> list[str]:
    """Every registered variant name, in registration order (simplest first: ties go to the simpler one)."""
    return [name for name, _ in RUNTIME_VARIANTS.items()]
