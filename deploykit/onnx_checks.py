"""Structural checks of explicit-quantization (Q/DQ) ONNX graphs, the form TensorRT builds INT8 engines from.

TensorRT fuses ``DequantizeLinear -> Conv/Gemm/MatMul`` into an INT8 kernel only when *both* the
activation and the weight arrive through a DequantizeLinear, the activation scale is per-tensor, the
weight scale is per output channel, and the quantization is symmetric INT8 (zero point 0). A node that
misses one of these silently runs in float on the GPU. This module checks those rules on the graph
itself, so a TensorRT-ready artifact can be verified on a machine without TensorRT.

Example:
    >>> report = check_qdq_placement("model.int8.onnx")   # raises QdqCheckError when a rule fails
    >>> report["quantized"], report["float_by_rule"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ParityError

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# Weight axis that carries the output channels, per op (Gemm depends on transB, see _weight_axis).
_INT8 = 3  # onnx.TensorProto.INT8


class QdqCheckError(ParityError):
    """A Q/DQ graph breaks a rule TensorRT needs to build INT8 kernels from it."""


def _weight_axis(node, attrs: dict[str, Any]) -> int:
    if node.op_type == "Conv":
        return 0                              # weight [OC, IC/g, kH, kW]
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1   # B is [N, K] with transB=1, else [K, N]
    return 1                                  # MatMul: B is [K, N]


def check_qdq_placement(model: str | Path | Any, *, small_gemm_dim: int = 16, allow_float: tuple[str, ...] = (),
                        raise_on_failure: bool = True) -> dict:
    """Check that a Q/DQ ONNX model is quantized the way TensorRT fuses it.

    Rules: (1) every Conv/Gemm/MatMul reads its activation (input 0) and weight (input 1) through a
    DequantizeLinear; (2) every QuantizeLinear feeds only DequantizeLinear nodes with the same scale and
    zero point, and every DequantizeLinear reads a QuantizeLinear or an INT8 constant (no dangling
    halves); (3) weight scales are per output channel on the right axis, activation scales per tensor;
    (4) zero points are INT8 zeros (TensorRT supports symmetric INT8 only).

    Gemm/MatMul nodes whose weight has a dimension below ``small_gemm_dim`` may stay float: TensorRT's
    INT8 tensor-core kernels need K, N >= 16 and nvidia-modelopt deliberately leaves such layers
    (e.g. a 10-class classifier) unquantized. Pass ``small_gemm_dim=0`` to demand every layer.

    Args:
        model: path to an ONNX file or a loaded ``onnx.ModelProto``.
        small_gemm_dim: see above.
        allow_float: node names that are allowed to stay float (recorded in the report).
        raise_on_failure: raise QdqCheckError listing the first problems instead of returning them.

    Returns:
        {"ok", "quantized": [...], "float_by_rule": {name: reason}, "problems": [...], "counts": {...}}
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    g = proto.graph
    init = {t.name: t for t in g.initializer}
    for n in g.node:  # Constant nodes hold scales/zero points in some exporters
        if n.op_type == "Constant" and n.attribute:
            init[n.output[0]] = n.attribute[0].t
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def const(name: str):
        t = init.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def through_identity(name: str):
        n = producer.get(name)
        while n is not None and n.op_type == "Identity":
            n = producer.get(n.input[0])
        return n

    problems: list[str] = []
    quantized: list[str] = []
    float_by_rule: dict[str, str] = {}

    # (2) + (4): Q/DQ pairs
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            users = consumers.get(n.output[0], [])
            if not users or n.output[0] in graph_outputs:
                problems.append(f"QuantizeLinear {n.name!r} output is not consumed by a DequantizeLinear (dangling)")
            for u in users:
                if u.op_type != "DequantizeLinear":
                    problems.append(f"QuantizeLinear {n.name!r} feeds {u.op_type} {u.name!r}, not a DequantizeLinear")
                    continue
                for k, what in ((1, "scale"), (2, "zero point")):
                    a = const(n.input[k]) if len(n.input) > k else None
                    b = const(u.input[k]) if len(u.input) > k else None
                    if a is not None and b is not None and (a.shape != b.shape or not np.array_equal(a, b)):
                        problems.append(f"Q/DQ pair {n.name!r} -> {u.name!r} has different {what}s")
        elif n.op_type == "DequantizeLinear":
            src = producer.get(n.input[0])
            if src is None and n.input[0] not in init:
                problems.append(f"DequantizeLinear {n.name!r} reads graph input {n.input[0]!r}, not a QuantizeLinear")
            elif src is not None and src.op_type != "QuantizeLinear":
                problems.append(f"DequantizeLinear {n.name!r} reads {src.op_type} {src.name!r}, not a QuantizeLinear")
            elif src is None and init[n.input[0]].data_type != _INT8:
                problems.append(f"DequantizeLinear {n.name!r} reads a constant that is not INT8")
            if not consumers.get(n.output[0]) and n.output[0] not in graph_outputs:
                problems.append(f"DequantizeLinear {n.name!r} output is unused (dangling)")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) > 2:
                zp_t = init.get(n.input[2])
                zp = const(n.input[2])
                if zp_t is not None and zp_t.data_type != _INT8:
                    problems.append(f"{n.op_type} {n.name!r} zero point is {onnx.TensorProto.DataType.Name(zp_t.data_type)}"
                                    ", TensorRT needs INT8")
                elif zp is not None and np.any(zp != 0):
                    problems.append(f"{n.op_type} {n.name!r} has a non-zero zero point (asymmetric); TensorRT needs 0")

    # (1) + (3): compute nodes
    for n in g.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        act, wgt = producer.get(n.input[0]), through_identity(n.input[1])
        w_arr = const(n.input[1])
        if w_arr is None and wgt is not None and wgt.op_type == "DequantizeLinear":
            w_arr = const(wgt.input[0])
            if w_arr is None and producer.get(wgt.input[0]) is not None:
                w_arr = const(producer[wgt.input[0]].input[0])
        act_ok = act is not None and act.op_type == "DequantizeLinear"
        wgt_ok = wgt is not None and wgt.op_type == "DequantizeLinear"
        if not (act_ok and wgt_ok):
            dims = list(w_arr.shape) if w_arr is not None else []
            if n.op_type != "Conv" and len(dims) == 2 and 0 < min(dims) < small_gemm_dim and not (act_ok or wgt_ok):
                float_by_rule[n.name] = (f"{n.op_type} weight {dims[0]}x{dims[1]} has a dimension < {small_gemm_dim}: "
                                         "too small for INT8 tensor cores, left float by design")
            elif n.name in allow_float:
                float_by_rule[n.name] = "allowed float by the caller"
            else:
                missing = [w for w, ok in (("activation", act_ok), ("weight", wgt_ok)) if not ok]
                problems.append(f"{n.op_type} {n.name!r}: {' and '.join(missing)} not quantized (no DequantizeLinear)")
            continue
        quantized.append(n.name)
        a_scale = const(act.input[1])
        if a_scale is not None and a_scale.size != 1:
            problems.append(f"{n.op_type} {n.name!r}: activation scale has {a_scale.size} values; TensorRT needs per-tensor")
        w_scale = const(wgt.input[1])
        if w_scale is None or w_arr is None:
            continue
        axis = _weight_axis(n, attrs)
        dq_axis = {a.name: a.i for a in wgt.attribute}.get("axis", 1)
        out_ch = w_arr.shape[axis]
        if w_scale.size != out_ch or (out_ch > 1 and dq_axis % w_arr.ndim != axis):
            problems.append(f"{n.op_type} {n.name!r}: weight scale has shape {list(w_scale.shape)} on axis {dq_axis}; "
                            f"expected per-channel ({out_ch},) on axis {axis}")

    ops = [n.op_type for n in g.node]
    report = {
        "ok": not problems,
        "quantized": quantized,
        "float_by_rule": float_by_rule,
        "problems": problems,
        "counts": {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
                   **{op: ops.count(op) for op in COMPUTE_OPS}, "quantized": len(quantized),
                   "float_by_rule": len(float_by_rule)},
    }
    if problems and raise_on_failure:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise QdqCheckError(f"Q/DQ graph is not TensorRT-ready: {'; '.join(problems[:3])}{more}",
                            fix="re-run the quantize_tensorrt stage, or exclude the node in the recipe")
    return report
