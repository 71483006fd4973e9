"""FP16 / BF16 variants of the float ONNX.

fp16: weights and activations cast with onnxconverter-common (inputs/outputs stay float32), for GPU
targets; ONNX Runtime CPU can still run it, which is how its parity is checked here.
bf16: on CPU, ONNX Runtime has no bf16 Conv kernels, so bf16 is a *runtime setting*: the float ONNX
runs on OpenVINO with inference precision bf16. The report times it against f32, because on a CPU
without AMX bf16 was measured slower than f32 (resnet50: 49.5 vs 29.9 ms).

Example:
    >>> cast_fp16(Path("m.onnx"), Path("m.fp16.onnx"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ParityError, RuntimeUnavailable
from .config import StageConfig
from .base import PipelineState, RuntimeChoice, Stage, register
from .export_onnx import check_parity


def cast_fp16(src: Path, dst: Path) -> Path:
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # onnxconverter-common retypes a Cast's output to float16 but leaves its ``to=FLOAT``: ONNX Runtime then refuses
    # the model ("Type (tensor(float16)) of output arg ... Cast_output_0"). timm's ViT and EfficientViT attention
    # cast a shape-derived scale to float; such Casts must produce float16 like the rest of the graph.
    fp16_values = {v.name for v in model.graph.value_info
                   if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_values:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    onnx.save(model, str(dst))
    return dst


@register("cast")
class Cast(Stage):
    """Float ONNX -> fp16 ONNX (GPU) or bf16 OpenVINO execution (CPU), with a parity check."""

    class Config(StageConfig):
        dtype: Literal["fp16", "bf16"] = "fp16"
        atol: float = Field(0.05, gt=0, description="max abs logit diff vs FP32, scaled by max|logit| if > 1")
        min_top1_agreement: float = Field(98.0, ge=0, le=100)

    def run(self, state: PipelineState) -> dict:
        from ..backends import create_backend, run_batched

        c = self.config
        if state.onnx_fp32_path is None:
            raise ParityError("cast needs a float ONNX model", fix="put export_onnx before it in the recipe")
        src = state.onnx_fp32_path
        x = state.check_inputs()
        ref = state.reference_check_logits()
        if c.dtype == "fp16":
            path = cast_fp16(src, state.workdir / "model.fp16.onnx")
            backend, runtime = create_backend("onnxruntime", path, precision="fp16"), RuntimeChoice("onnxruntime")
        else:
            path = src
            runtime = RuntimeChoice("openvino", {"precision": "bf16"})
            try:  # a CPU may advertise BF16 and still refuse it (oneDNN limited by ONEDNN_MAX_CPU_ISA, old kernels)
                backend = create_backend("openvino", path, precision="bf16")
                backend.run(x[:1])
            except RuntimeError as err:
                raise RuntimeUnavailable(f"OpenVINO cannot run BF16 on this CPU ({' '.join(str(err).split())[:160]})",
                                         fix="use --int8 or --fp32 here, or run the bf16 recipe on a CPU with "
                                             "AVX512-BF16 or AMX") from None
        got = run_batched(backend.run, x)
        fid = check_parity(ref, got, c.atol, c.min_top1_agreement, f"{c.dtype} model")
        state.onnx_path, state.precision, state.runtime = path, c.dtype, runtime
        return {"file": path.name, "dtype": c.dtype, "runtime": {"backend": runtime.backend, "settings": runtime.settings},
                "parity": fid}
