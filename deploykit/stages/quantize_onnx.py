"""INT8 post-training static quantization for CPU with ONNX Runtime: QDQ, per-channel weights.

The settings are the ones that measured fast on this machine's VNNI CPU (timm resnet50 bs1:
10.4 ms vs 29.5 ms FP32). ``quantize_static``'s *defaults* (per-tensor, S8 activations) gave no gain
at all (29.5 ms) and were slower than FP32 at batch 32, so nothing here relies on them.

Transformer graphs (attention: MatMul with Softmax or LayerNormalization, see ``detect_model_type``) quantize
only their compute ops (``TRANSFORMER_OP_TYPES``: Conv, MatMul, Gemm) and keep LayerNorm, Softmax, GELU and the
residual Adds in float. With ORT's default (quantize every op it supports: LayerNorm inputs and the residual
stream in per-tensor U8) a 2-block ViT with random weights agreed with FP32 on 34% of 64 digits images at
11.2 dB SQNR; with Conv/MatMul/Gemm only, 100% at 30.0 dB (DeiT 11.2 -> 28.5 dB, EfficientViT-B0 9.0 -> 28.6 dB).
CNNs keep the default op list, unchanged (the measurements in docs/decisions.md were made with it).
``on_fidelity_failure: withhold`` (the int8-ptq recipe) keeps a failing INT8 model out of select_runtime's
candidates instead of failing the run, so the float model ships and the report says why.

Example:
    >>> quantize_onnx(Path("m.onnx"), Path("m.int8.onnx"), calib_batches, method="minmax")
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from pydantic import Field

from ..errors import ParityError
from .config import Int8CheckConfig
from .base import PipelineState, QuantSettings, RuntimeChoice, Stage, register
from .export_onnx import INPUT_NAME

ModelType = Literal["auto", "cnn", "transformer"]
# What a transformer graph quantizes: the ops that carry the MACs. Everything else (LayerNormalization, Softmax,
# Erf/GELU, Add, Mul, Reshape/Transpose...) stays float, so no Q/DQ pair sits on the residual stream.
TRANSFORMER_OP_TYPES = ("Conv", "MatMul", "Gemm")
# ONNX Runtime quantizes a normalization's 1-D scale per channel along axis 1 by default, which a 1-D tensor
# lacks: it logs "Axis 1 is out-of-range for weight ..." once per use and falls back to one per-tensor scale.
# Their channel axis is the last one.
_NORM_AXIS = {"LayerNormalization": -1, "InstanceNormalization": -1, "BatchNormalization": -1}


def detect_model_type(onnx_path: Path, torch_model=None) -> str:
    """"transformer" when the float graph has attention or token-mixing structure, else "cnn".

    The ONNX graph decides: a MatMul together with a Softmax or a LayerNormalization (ViT, DeiT, Swin, LeViT,
    EfficientViT; ConvNeXt too: LayerNorm + Linear MLPs). Failing that, a graph with a MatMul or a Softmax whose
    torch model has attention modules: ``nn.MultiheadAttention``, a module with an int ``num_heads``, or a class
    named ``*Attention`` (MobileViT-v2's separable attention is Softmax + elementwise ops, with GroupNorm exported
    as InstanceNormalization: no MatMul, no LayerNormalization). Channel attention in CNNs (SE, ECA, CBAM's
    ``*Attn``, ResNeSt's ``SplitAttn``) matches none of these.
    """
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    if "MatMul" in ops and ops & {"Softmax", "LayerNormalization"}:
        return "transformer"
    if ops & {"MatMul", "Softmax"} and torch_model is not None:
        import torch

        if any(isinstance(m, torch.nn.MultiheadAttention) or isinstance(getattr(m, "num_heads", None), int)
               or type(m).__name__.endswith("Attention") for m in torch_model.modules()):
            return "transformer"
    return "cnn"


def resolve_op_types(model_type: str, op_types: list[str] | None) -> list[str] | None:
    """The op types to quantize: explicit ones win; a transformer gets TRANSFORMER_OP_TYPES; a CNN None (ORT's
    full default list)."""
    if op_types:
        return list(op_types)
    return list(TRANSFORMER_OP_TYPES) if model_type == "transformer" else None


def quant_extra_options(method: str, percentile: float) -> dict:
    """extra_options for ``quantize_static`` shared by quantize_onnx and the accuracy guard."""
    extra: dict = {"QDQOpTypePerChannelSupportToAxis": dict(_NORM_AXIS)}
    # Not CalibMaxIntermediateOutputs (which would bound the calibrator's memory): ONNX Runtime 1.32's MinMax
    # calibrator clears the collected outputs when that count is reached without merging their ranges first.
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    return extra


def calibration_reader(batches: Iterable[np.ndarray], input_name: str = INPUT_NAME):
    """An ONNX Runtime CalibrationDataReader over float32 NCHW batches."""
    from onnxruntime.quantization import CalibrationDataReader

    from ..stop import check_stop

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            check_stop()  # ORT calls this between calibration batches: the one Python moment in a long call
            x = next(self._it, None)
            return None if x is None else {input_name: np.ascontiguousarray(x, dtype=np.float32)}

    return Reader()


def quantize_onnx(src: Path, dst: Path, batches: Iterable[np.ndarray], *, method: str = "minmax",
                  per_channel: bool = True, activation_type: str = "uint8", weight_type: str = "int8",
                  quant_format: str = "qdq", percentile: float = 99.999, exclude_nodes: list[str] | None = None,
                  reduce_range: bool = True, preprocess: bool = True, op_types: list[str] | None = None) -> Path:
    """Calibrate on ``batches`` and write the quantized model to ``dst``.

    ``op_types``: the ONNX op types to quantize (None: every op ONNX Runtime can, its default, the CNN setting;
    ``resolve_op_types`` gives the transformer list).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model_in = src
        if preprocess:  # shape inference + graph optimisation (folds BN, fuses patterns) before quantizing
            model_in = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=True)
        quantize_static(
            str(model_in), str(dst), calibration_reader(batches),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=types[activation_type],
            weight_type=types[weight_type],
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            nodes_to_exclude=list(exclude_nodes or []),
            op_types_to_quantize=list(op_types) if op_types else None,
            extra_options=quant_extra_options(method, percentile),
        )
    return dst


def resolve_reduce_range(setting: "bool | str") -> tuple[bool, str]:
    """(reduce_range to quantize with, why): ``auto`` follows this CPU's INT8 dot product (see Config.reduce_range)."""
    from ..environment import has_int8_vnni

    if setting != "auto":
        return bool(setting), "set in the recipe"
    if has_int8_vnni():
        return False, "auto: this CPU has VNNI/AMX (int32 accumulation), so weights use the full 8-bit range"
    return True, "auto: this CPU has no VNNI, so weights use 7 bits (ONNX Runtime's VPMADDUBSW saturates int16)"


def count_qdq(path: Path) -> dict:
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "nodes": len(ops)}


@register("quantize_onnx")
class QuantizeOnnx(Stage):
    """Float ONNX -> INT8 QDQ ONNX for ONNX Runtime CPU, calibrated on real or synthetic images."""

    class Config(Int8CheckConfig):
        method: Literal["minmax", "entropy", "percentile"] = "minmax"
        percentile: float = Field(99.999, gt=90, le=100)
        per_channel: bool = True
        # auto: 7-bit weights on a CPU without VNNI, 8-bit on one with it (resolve_reduce_range). Without VNNI,
        # ONNX Runtime's x86 U8S8 kernels add pairs of products with VPMADDUBSW, which saturates int16 with
        # full-range weights: on the reference model (2-core AMD EPYC, AVX2) 7-bit weights raised top-1 agreement
        # with FP32 from 96.9% to 99.3%. With VNNI/AMX the products accumulate in int32 and the 7th bit is only
        # lost precision: on the pruned Lite0 (Intel Xeon AMX) 8-bit weights raised agreement from 95.8% to 98.8%
        # and top-1 from 84.76% to 85.75% (FP32 85.56%). docs/decisions.md.
        reduce_range: bool | Literal["auto"] = "auto"
        activation_type: Literal["uint8", "int8"] = "uint8"
        weight_type: Literal["int8", "uint8"] = "int8"
        format: Literal["qdq", "qoperator"] = "qdq"
        calibration_batch_size: int = Field(4, ge=1, description="images per calibration run; the ranges do not "
                                            "depend on it, the memory does (ResNet-50: 1.2 GB at 4, 3.9 GB at 32)")
        exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names kept in float")
        model_type: ModelType = Field("auto", description="transformer: quantize only Conv/MatMul/Gemm, keep "
                                                          "LayerNorm/Softmax/GELU/Add float; auto: detect from the "
                                                          "graph (MatMul with Softmax or LayerNorm)")
        op_types: list[str] | None = Field(None, description="ONNX op types to quantize; overrides model_type's "
                                                             "choice (None: by model_type)")

    def run(self, state: PipelineState) -> dict:
        from ..backends import run_batched
        from ..evaluate import fidelity

        c = self.config
        if state.onnx_path is None:
            raise ParityError("quantize_onnx needs an ONNX model", fix="put export_onnx before it in the recipe")
        calib = state.calibration_inputs()
        bs = c.calibration_batch_size
        dst = state.workdir / "model.int8.onnx"
        src = state.onnx_fp32_path or state.onnx_path
        model_type = c.model_type if c.model_type != "auto" else detect_model_type(src, state.model)
        op_types = resolve_op_types(model_type, c.op_types)
        reduce_range, reduce_why = resolve_reduce_range(c.reduce_range)
        facts = {"file": dst.name, "calibration_images": int(len(calib)), "method": c.method,
                 "per_channel": c.per_channel, "reduce_range": reduce_range, "reduce_range_why": reduce_why,
                 "activation_type": c.activation_type,
                 "weight_type": c.weight_type, "model_type": model_type,
                 "op_types": op_types or "all (ONNX Runtime default)"}
        x = state.check_inputs()
        run = lambda p, precision="fp32": run_batched(state.backend("onnxruntime", p, precision=precision).run, x)  # noqa: E731
        ref = state.reference_check_logits() if src == state.onnx_fp32_path else run(src)
        try:
            quantize_onnx(state.onnx_path, dst, (calib[i:i + bs] for i in range(0, len(calib), bs)),
                          method=c.method, per_channel=c.per_channel, activation_type=c.activation_type,
                          weight_type=c.weight_type, quant_format=c.format, percentile=c.percentile,
                          exclude_nodes=c.exclude_nodes, reduce_range=reduce_range, op_types=op_types)
            got = run(dst, "int8")  # the session select_runtime's onnxruntime-int8 candidate reuses
        except Exception as err:  # an ORT quantizer or kernel failure on an unusual graph
            if c.on_fidelity_failure == "error":
                raise
            why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            return self._withhold(state, dst, facts, model_type,
                                  f"ONNX Runtime could not quantize or run the INT8 model ({why})")
        fid = fidelity(ref, got)
        facts.update(qdq=count_qdq(dst), fidelity_vs_fp32=fid)
        problem = c.fidelity_problem(fid, data_free=state.data is None)
        if problem:
            problem = f"INT8 model {problem}"
            if c.on_fidelity_failure == "error":
                raise ParityError(problem, fix="calibrate on real data (--data), try --calibration-method "
                                               "entropy/percentile, or exclude sensitive nodes")
            return self._withhold(state, dst, facts, model_type, problem)
        state.onnx_path, state.precision = dst, "int8"
        state.add_model("int8-qdq", dst)
        state.quantization = QuantSettings(method=c.method, per_channel=c.per_channel,
                                           activation_type=c.activation_type, weight_type=c.weight_type,
                                           reduce_range=reduce_range,
                                           op_types=tuple(op_types) if op_types else None)
        state.runtime = RuntimeChoice("onnxruntime")
        return facts

    @staticmethod
    def _withhold(state: PipelineState, dst: Path, facts: dict, model_type: str, problem: str) -> dict:
        """Keep the INT8 model out of the runtime candidates (the float model stays the one to ship), saying why."""
        state.withheld["int8-qdq"] = f"quantize_onnx ({model_type}): {problem}"
        state.log(f"[yellow]quantize_onnx ({model_type}): {problem}; withheld from the candidates[/]")
        dst.unlink(missing_ok=True)  # an artifact holds no model that failed its check
        return {**facts, "file": None, "withheld": problem}
