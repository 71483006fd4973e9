"""Quantization-aware training (QAT): INT8 fake-quant fine-tuning with the distillation loss, exported as QDQ ONNX.

Why PyTorch's own FX QAT and not nvidia-modelopt's ``mtq``: the fake-quant scheme here is chosen to be the
one ONNX Runtime's CPU kernels execute fast and exactly, the same as the ``quantize_onnx`` PTQ path:

- activations U8 asymmetric per tensor, weights S8 symmetric per output channel with *7-bit* range
  (-64..63). x86 CPUs without VNNI multiply U8 x S8 pairs with VPMADDUBSW, which saturates int16 with
  full-range weights (see quantize_onnx.reduce_range); training with the range the kernel can hold means
  nothing is learned that the runtime then clips.
- modelopt's INT8 ONNX (S8 symmetric activations) ran 3x slower than ours on ONNX Runtime CPU in the peers
  benchmark (bench/results/peers_reference: 11.6 vs 3.6 ms at batch 32), so its export is the wrong target
  for the CPU artifact. ``torch.ao.quantization`` prints a deprecation notice in torch 2.14 but works; its
  successor (torchao pt2e) is not a dependency yet.

Flow: trace the fused model with torch.fx (nn.Identity leftovers of Conv-BN fusion removed, so Conv+ReLU
patterns fuse), insert fake-quant with ``prepare_qat_fx``, calibrate the observers on the calibration images,
KD fine-tune with ``training.fit_distill`` (teacher = the original model), recalibrate the final EMA weights,
freeze, and export with the TorchScript exporter: fake-quant ops become QuantizeLinear/DequantizeLinear
pairs that ONNX Runtime fuses into QLinearConv etc. With ``compare_ptq`` the stage also quantizes the same
FP32 ONNX with PTQ and reports both on the held-out validation images, so "did QAT pay?" is answered by
the report, not assumed.

Example (recipe):
    stages:
      - fuse_bn
      - export_onnx
      - qat: {epochs: 1, lr: 1.0e-4}
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydantic import Field

from ..errors import DataError, ParityError
from ..training import DistillConfig
from .base import PipelineState, RuntimeChoice, Stage, register

QAT_FILE = "model.qat.onnx"
WEIGHT_RANGE_7BIT = (-64, 63)


def qat_qconfig_mapping(reduce_range: bool = True):
    """U8 asymmetric per-tensor activations; S8 symmetric per-channel weights (7-bit with ``reduce_range``)."""
    import torch
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig, QConfigMapping)

    wmin, wmax = WEIGHT_RANGE_7BIT if reduce_range else (-128, 127)
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=wmin, quant_max=wmax,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=act, weight=weight))


def strip_identities(model):
    """torch.fx GraphModule of ``model`` without nn.Identity calls (fused-away BN, eval-mode DropBlock)."""
    import torch
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def prepare_qat(model, example, reduce_range: bool = True):
    """Fake-quantized GraphModule of a (BN-fused) float model, ready to train. ``example``: one input batch.

    The result shares its parameters with ``model`` (training it changes ``model``'s weights): pass a copy
    if the float model must survive, as the pipeline does (its ``state.model`` is a copy of the teacher).
    """
    import torch
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from ..errors import RecipeError

    try:
        gm = strip_identities(model)
    except Exception as e:  # data-dependent control flow: torch.fx cannot trace it
        raise RecipeError(f"QAT needs a torch.fx-traceable model; tracing {type(model).__name__} failed: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          fix="use the int8-ptq recipe (post-training quantization) for this model") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's notice; see module docstring
        return prepare_qat_fx(gm.train(), qat_qconfig_mapping(reduce_range), (torch.as_tensor(example),))


def calibrate_observers(qmodel, batches) -> None:
    """Reset every observer, run ``batches`` through with observers on, then freeze the scales."""
    import torch
    from torch.ao.quantization import disable_observer, enable_observer

    qmodel.apply(enable_observer)
    for m in qmodel.modules():
        if hasattr(m, "reset_min_max_vals"):
            m.reset_min_max_vals()
    was_training = qmodel.training
    qmodel.eval()
    with torch.no_grad():
        for x in batches:
            qmodel(torch.as_tensor(x))
    qmodel.apply(disable_observer)
    qmodel.train(was_training)


def export_qat_onnx(qmodel, path: Path, input_size: tuple[int, int, int], opset: int = 17) -> Path:
    """Write the frozen fake-quant model as QDQ ONNX that ONNX Runtime runs as INT8."""
    import torch
    from torch.ao.quantization import FakeQuantize

    from .export_onnx import export_onnx

    weight_quantizers = [(m.weight, m.weight_fake_quant) for m in qmodel.modules() if hasattr(m, "weight_fake_quant")]
    for node in qmodel.graph.nodes:  # weights FX quantizes as plain inputs (a Conv2d subclass traced to F.conv2d)
        if node.op == "call_module" and node.args and getattr(node.args[0], "op", None) == "get_attr":
            fq = qmodel.get_submodule(node.target)
            if isinstance(fq, FakeQuantize):
                weight_quantizers.append((qmodel.get_parameter(node.args[0].target), fq))
    with torch.no_grad():
        for weight, fq in weight_quantizers:
            # Bake the 7-bit rounding into the weights: re-quantizing them with the same scale and the full int8
            # range below is then exact (ONNX QuantizeLinear only knows the full range).
            weight.copy_(fq(weight))
    for fq in qmodel.modules():
        if isinstance(fq, FakeQuantize) and (fq.quant_min, fq.quant_max) == WEIGHT_RANGE_7BIT:
            # FakeQuantize.forward reads the range from its observer, not from itself: widen both
            fq.quant_min, fq.quant_max = -128, 127
            fq.activation_post_process.quant_min, fq.activation_post_process.quant_max = -128, 127
    try:
        export_onnx(qmodel.eval(), path, input_size, opset)
    except Exception as e:  # the exporter's messages embed the whole graph: keep the first line
        raise ParityError(f"exporting the QAT model to ONNX failed: {str(e).splitlines()[0][:300]}",
                          fix="use the int8-ptq recipe for this model, and report it as a bug") from e
    tidy_qdq_onnx(path)
    return path


def tidy_qdq_onnx(path: Path) -> dict:
    """Make the TorchScript export of a fake-quant model a compact INT8 QDQ file; returns counts of what changed.

    - Per-tensor Q/DQ scales and zero points exported with shape [1] become scalars (ONNX Runtime's
      QLinearAveragePool and friends reject [1]: 'Scale and Zero-point must be a scalar').
    - QuantizeLinear of constant float weights is folded into int8 initializers, so the file holds INT8
      weights (FP32-sized otherwise; ONNX Runtime would fold them at every session start anyway).
    - The Identity nodes and initializers left unused are dropped.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def tensor(name):
        while name in alias:
            name = alias[name]
        return inits.get(name)

    scalars = 0
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(a.name == "axis" for a in node.attribute):
            for name in node.input[1:3]:
                t = tensor(name)
                if t is not None and list(t.dims) == [1]:
                    del t.dims[:]
                    scalars += 1

    folded, keep = 0, []
    for node in graph.node:
        w = tensor(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if w is None or w.data_type != onnx.TensorProto.FLOAT:
            keep.append(node)
            continue
        x, scale = numpy_helper.to_array(w), numpy_helper.to_array(tensor(node.input[1]))
        zp = numpy_helper.to_array(tensor(node.input[2]))
        if scale.ndim == 1 and scale.size > 1:  # per-axis: broadcast along the node's axis (ONNX default 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    outputs = {o.name for o in graph.output}
    for node in graph.node:  # read constants directly, not through Identity aliases
        for i, name in enumerate(node.input):
            if name in alias and tensor(name) is not None and node.op_type != "Identity" and name not in outputs:
                node.input[i] = tensor(name).name

    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    while True:  # drop nodes (the Identity aliases) whose outputs nothing reads, until none are left
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"scalarized_qparams": scalars, "folded_weights": folded, "dropped_initializers": len(unused)}


def _run_reference_semantics(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of ``path`` with every ONNX Runtime graph optimisation off: Q/DQ run as written, no fused kernels."""
    import onnxruntime as ort

    from .export_onnx import INPUT_NAME

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


class QatConfig(DistillConfig):
    """The KD trainer's options with QAT defaults (short, low learning rate: the model is already trained)."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_epochs: float = Field(0.1, ge=0)
    reduce_range: bool = Field(True, description="7-bit weights: what ONNX Runtime's U8S8 kernels hold without VNNI")
    calibration_batch_size: int = Field(32, ge=1)
    compare_ptq: bool = Field(True, description="also quantize with PTQ and report both on the validation images")
    opset: int = Field(17, ge=13, le=23)
    min_agreement_with_fake_quant: float = Field(
        99.0, ge=0, le=100, description="% top-1 agreement of the ONNX export (reference QDQ semantics) with the "
                                        "torch fake-quant model")
    min_sqnr_vs_fake_quant: float = Field(20.0, description="SQNR (dB) of the export vs the fake-quant model")


@register("qat")
class Qat(Stage):
    """Fake-quant KD fine-tuning of state.model, exported to model.qat.onnx (QDQ INT8 for ONNX Runtime)."""

    Config = QatConfig

    def run(self, state: PipelineState) -> dict:
        import torch

        from ..backends import create_backend, run_batched
        from ..data import data_help
        from ..evaluate import classification_metrics, fidelity
        from ..training import fit_distill

        c = self.config
        if state.data is None:
            raise DataError("the qat stage needs labelled training images",
                            fix=f"pass --data ({data_help()}), or use int8-ptq")
        if state.onnx_fp32_path is None:
            raise ParityError("qat needs the float ONNX model to check against", fix="put export_onnx before it")
        calib = state.calibration_inputs()

        def calibration_batches():
            bs = c.calibration_batch_size
            return (calib[i:i + bs] for i in range(0, len(calib), bs))

        def prepare(model):
            q = prepare_qat(model, calib[:2], c.reduce_range)
            calibrate_observers(q, calibration_batches())
            q.apply(torch.ao.quantization.enable_observer)  # the ranges follow the weights while training
            return q

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            qmodel, res = fit_distill(state.model, state.teacher, state.data.train, state.preprocessing, c,
                                      log=state.log, tag="qat", prepare_student=prepare)
            calibrate_observers(qmodel, calibration_batches())
            dst = export_qat_onnx(qmodel, state.workdir / QAT_FILE, state.preprocessing.input_size, c.opset)

        x = state.check_inputs()
        with torch.inference_mode():
            fq = np.concatenate([qmodel(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])
        # Export correctness is judged on ONNX's reference QDQ semantics (graph optimisations off: float math on
        # dequantized values, what the fake-quant model computes). The fused integer kernels round each layer's
        # requantization their own way; on a fragile model that alone moves logits (QAT tf_efficientnet_lite0 on
        # Fashion-MNIST-LT vs its fake-quant model: 100% / 34.7 dB on the reference semantics, 94.5% / 22.6 dB
        # with ORT's fused kernels), so the kernels are judged by accuracy, like every INT8 model, not here.
        # tolerance: requantization rounding moves logits by well under 5% of their range
        vs_fake_quant = fidelity(fq, _run_reference_semantics(dst, x), tol=0.05 * float(np.abs(fq).max()))
        # Agreement where rounding cannot flip the argmax, and SQNR: weights the export failed to bake gave
        # 15-19 dB against the fake-quant model, correct exports 23-43 dB (AVX2 and AVX-512 machines).
        if (vs_fake_quant["decided_agreement"] < c.min_agreement_with_fake_quant
                or vs_fake_quant["sqnr_db"] < c.min_sqnr_vs_fake_quant):
            raise ParityError(f"the QAT ONNX export agrees with its torch fake-quant model on only "
                              f"{vs_fake_quant['decided_agreement']:.1f}% of the inputs it decides clearly "
                              f"(limit {c.min_agreement_with_fake_quant}%) at SQNR {vs_fake_quant['sqnr_db']:.1f} dB "
                              f"(limit {c.min_sqnr_vs_fake_quant})",
                              fix="report the model as a bug; meanwhile use the int8-ptq recipe")
        run = lambda p: run_batched(create_backend("onnxruntime", p).run, x)  # noqa: E731
        got, ref = run(dst), state.reference_check_logits()
        facts = {"file": dst.name, "epochs_run": len(res.history), "best_epoch": res.best_epoch,
                 "history": res.history, "train_images": res.train_images, "reduce_range": c.reduce_range,
                 "calibration_images": int(len(calib)), "fidelity_vs_fp32": fidelity(ref, got),
                 "fidelity_vs_fake_quant": vs_fake_quant, "kernels_vs_fake_quant": fidelity(fq, got)}

        if c.compare_ptq:  # same float ONNX, same calibration images, judged on the held-out train slice
            from .quantize_onnx import quantize_onnx

            ptq = quantize_onnx(state.onnx_fp32_path, state.workdir / "model.ptq-compare.onnx", calibration_batches(),
                                reduce_range=c.reduce_range)
            val = state.data.train.subset(res.val_indices)
            scores = {}
            for name, path in (("fp32", state.onnx_fp32_path), ("ptq", ptq), ("qat", dst)):
                be = create_backend("onnxruntime", path)
                logits = np.concatenate([be.run(xb) for xb, _ in val.batches(state.preprocessing, 64)])
                m = classification_metrics(logits, val.labels, len(state.data.train.class_names))
                scores[name] = {"top1": m["top1"], "macro_f1": m["macro_f1"]}
            ptq.unlink()  # a comparison, not an artifact
            facts["qat_vs_ptq"] = {"images": int(len(val)), "split": "held-out slice of the train split",
                                   **scores, "qat_beat_ptq": scores["qat"]["top1"] > scores["ptq"]["top1"]}
            state.log(f"qat: top-1 on {len(val)} held-out train images: FP32 {scores['fp32']['top1']:.2f}, "
                      f"PTQ {scores['ptq']['top1']:.2f}, QAT {scores['qat']['top1']:.2f}")

        state.model = qmodel
        state.onnx_path, state.precision = dst, "int8"
        state.add_model("qat-qdq", dst)
        state.validation_indices = res.val_indices
        state.runtime = RuntimeChoice("onnxruntime")
        return facts
