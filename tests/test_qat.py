"""QAT: fake-quant export is the INT8 model ONNX Runtime runs (7-bit weights, int8 file); the stage runs end to end."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_margin_agreement
from onnx import numpy_helper

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from deploykit import compress  # noqa: E402
from deploykit.backends import create_backend  # noqa: E402
from deploykit.errors import DataError, RecipeError  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.stages.export_onnx import export_onnx  # noqa: E402
from deploykit.stages.fuse_bn import fuse_conv_bn  # noqa: E402
from deploykit.stages.qat import calibrate_observers, export_qat_onnx, prepare_qat  # noqa: E402

REFERENCE = Path(__file__).parents[1] / "models" / "resnet10t_fmnist.pth"


def _fused_resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(8, 16, 32, 64)).eval()
    fuse_conv_bn(model)
    return model


def _exported_conv_weights(path):
    """(int8 values, dequantized float32) of every 4-D INT8 weight initializer, as its DequantizeLinear reads it."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = []
    for node in graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.dtype != np.int8 or q.ndim != 4:
            continue
        scale = inits[node.input[1]]
        if len(node.input) > 2 and node.input[2]:
            assert not inits[node.input[2]].any(), node.name          # symmetric weights: zero point 0
        if scale.size > 1:                                            # per output channel
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        out.append((q, q.astype(np.float32) * scale.astype(np.float32)))
    return out


def _assert_exported_weights_are_the_baked_ones(qmodel, path):
    """Exact, on any CPU: each INT8 conv weight of the file, dequantized, equals bit for bit one conv weight the
    fake-quant model computes with (baked onto the 7-bit grid by the export), and each is 7-bit."""
    baked = [p.detach().numpy() for p in qmodel.parameters() if p.ndim == 4]
    exported = _exported_conv_weights(path)
    assert len(exported) == len(baked)
    unmatched = list(range(len(baked)))
    for q, w in exported:
        assert int(np.abs(q).max()) <= 64, "weights beyond 7 bits"  # VPMADDUBSW saturates without VNNI
        i = next((i for i in unmatched if baked[i].shape == w.shape and np.array_equal(baked[i], w)), None)
        assert i is not None, f"an exported {w.shape} weight equals no baked fake-quant weight"
        unmatched.remove(i)
    return len(exported)


def test_qat_export_is_the_fake_quant_model_with_int8_7bit_weights(tmp_path):
    model = _fused_resnet()
    x = torch.randn(64, 1, 28, 28)
    q = prepare_qat(model, x[:2])
    calibrate_observers(q, [x[:32], x[32:]])
    with torch.no_grad():
        fake = q.eval()(x).numpy()
        float_out = model(x).numpy()
    path = export_qat_onnx(q, tmp_path / "qat.onnx", (1, 28, 28))
    got = create_backend("onnxruntime", path).run(x.numpy())
    # exact: all 15 conv weights are stored as int8, 7-bit, and are the fake-quant model's weights bit for bit
    assert _assert_exported_weights_are_the_baked_ones(q, path) == 15
    # ONNX Runtime's integer kernels vs torch's float fake-quant: the same grid; requantization rounds differently
    # at ties, so logits move by up to one output step (0.004). Measured 39.9 dB (AVX-512 VNNI) and 42.6 dB
    # (torch on AVX2 kernels); one conv's weight scale doubled in the file gives 8.5 dB.
    fid = fidelity(fake, got)
    assert fid["sqnr_db"] > 20, fid
    # This random net's top-two logits are often closer than that step (median gap 0.009, 7 exact ties), so plain
    # argmax agreement is 92-97% depending on the CPU. Inputs whose gap exceeds twice the max error: 32 (AVX-512) /
    # 35 (AVX2) of 64; a doubled weight scale leaves 0, un-baked weights 6.
    assert_margin_agreement(fake, got, min_decided=16)
    # still the float model, quantized: 32.3 dB measured on both ISAs
    assert fidelity(float_out, got)["sqnr_db"] > 15

    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "Identity"]
    assert not [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 28, 28))
    assert path.stat().st_size < 0.4 * fp32.stat().st_size


def test_export_keeps_the_fake_quant_model_when_fx_traces_through_a_conv_subclass(tmp_path):
    """static_pad's Conv2d subclass is traced to F.conv2d, so FX quantizes its weight as a plain input; the
    export must bake those 7-bit weights too (a first version did not: 15 dB SQNR between before and after)."""
    from deploykit.stages.qat import _run_reference_semantics
    from deploykit.stages.static_pad import make_padding_static

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    assert make_padding_static(model, (3, 32, 32)) > 0
    fuse_conv_bn(model)
    x = torch.randn(32, 3, 32, 32)
    q = prepare_qat(model, x[:2])
    calibrate_observers(q, [x])
    with torch.no_grad():
        before = q.eval()(x).numpy()
    path = export_qat_onnx(q, tmp_path / "lite.onnx", (3, 32, 32))
    with torch.no_grad():
        after = q(x).numpy()
    assert np.array_equal(before, after)                        # baking + widening changed nothing
    # exact: the F.conv2d weights are in the file as the 7-bit values the fake-quant model computes with
    assert _assert_exported_weights_are_the_baked_ones(q, path) == 49
    ref = _run_reference_semantics(path, x.numpy())
    # Reference QDQ semantics is float math on dequantized values: the fake-quant model up to float conv rounding,
    # which flips activation roundings at ties; through 16 blocks that gives 22.9 dB with oneDNN's AVX-512 kernels
    # and 35.5 dB with its AVX2 kernels. One conv's weight scale doubled gives 7.7 dB. (The un-baked F.conv2d bug
    # gives 19.3 dB: the SQNR cannot tell it from kernel rounding; the two exact checks above catch it.)
    fid = fidelity(before, ref)
    assert fid["sqnr_db"] > 15, fid
    # inputs whose top-two gap exceeds twice the max error: 30 (AVX-512) / 32 (AVX2) of 32; doubled scale: 0
    assert_margin_agreement(before, ref, min_decided=16)


def test_untraceable_model_is_refused_with_a_pointer_to_ptq():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(RecipeError) as e:
        prepare_qat(DataDependent(), torch.zeros(2, 1, 8, 8))
    assert "torch.fx-traceable" in str(e.value) and "int8-ptq" in str(e.value) and "\n" not in str(e.value)


def test_qat_needs_labelled_data(tmp_path):
    with pytest.raises(DataError, match="labelled training images"):
        compress(REFERENCE, "qat-int8", out=tmp_path / "x", data__name="none", eval__enabled=False)
    assert not (tmp_path / "x").exists()


def test_qat_recipe_on_the_reference_keeps_accuracy_and_reports_ptq_beside_it(tmp_path):
    res = compress(REFERENCE, "qat-int8", out=tmp_path / "q.deploykit", data__name="fashion-mnist",
                   data__eval_images=1000, data__calibration_images=256,
                   stages__qat__max_train_images=2000, stages__qat__cache_dir=str(tmp_path / "cache"),
                   stages__select_runtime__rounds=2, stages__select_runtime__time_torch=False,
                   stages__select_runtime__time_budget_s=3.0,
                   eval__latency_runs=5, eval__warmup_runs=1, eval__latency_budget_s=2.0)
    rep = res.report
    orig, comp = rep["models"]["original"], rep["models"]["compressed"]
    assert comp["precision"] == "int8" or rep["stage_facts"]["select_runtime"]["chosen"].endswith("fp32")
    assert abs(orig["top1"] - comp["top1"]) <= 1.5              # 1000 test images
    facts = rep["stage_facts"]["qat"]
    assert facts["fidelity_vs_fake_quant"]["top1_agreement"] >= 97.0
    cmp = facts["qat_vs_ptq"]
    assert cmp["images"] == 6000                                # the held-out 10% of the train split
    assert abs(cmp["qat"]["top1"] - cmp["fp32"]["top1"]) <= 1.0 and abs(cmp["ptq"]["top1"] - cmp["fp32"]["top1"]) <= 1.0
    assert cmp["qat_beat_ptq"] == (cmp["qat"]["top1"] > cmp["ptq"]["top1"])
    assert "## QAT vs PTQ" in (res.path / "report.md").read_text()
    assert not (res.path / "model.ptq-compare.onnx").exists()
    names = {c["name"] for c in rep["stage_facts"]["select_runtime"]["candidates"]}
    assert {"onnxruntime-qat", "openvino-qat"} <= names
