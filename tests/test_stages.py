"""Each stage's numerical equivalence, on real libraries (timm models, torch.onnx, ONNX Runtime)."""

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_margin_agreement, randomize_bn

timm = pytest.importorskip("timm")

from deploykit.backends import create_backend  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.stages.export_onnx import export_onnx  # noqa: E402
from deploykit.stages.fuse_bn import fuse_conv_bn  # noqa: E402
from deploykit.stages.quantize_onnx import count_qdq, quantize_onnx  # noqa: E402




# A ResNet, a MobileNetV3 and an EfficientNet-Lite (depthwise convs, timm BatchNormAct2d), plus a RegNet.
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050", "tf_efficientnet_lite0", "regnetx_002"])
def test_fuse_conv_bn_is_exact(arch):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(arch, num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        fused, n = fuse_conv_bn(copy.deepcopy(model))
        got = fused(x)
    assert n > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert type(fused) is type(model)  # edited in place: still the timm class, still prunable/exportable
    # float32 folding error: 1e-4 relative to the logit scale
    assert float((ref - got).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_fuse_leaves_shared_or_branching_bn_alone():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output used twice: folding BN into conv would be wrong

    m = randomize_bn(Branchy())
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    fused, n = fuse_conv_bn(m)
    assert n == 0
    torch.testing.assert_close(fused(x), ref)


@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)))


@pytest.fixture(scope="module")
def onnx_fp32(tiny_resnet, tmp_path_factory):
    return export_onnx(tiny_resnet, tmp_path_factory.mktemp("onnx") / "m.onnx", (1, 28, 28))


def test_export_onnx_matches_torch_with_dynamic_batch(tiny_resnet, onnx_fp32):
    ort = create_backend("onnxruntime", onnx_fp32, threads=1)
    refs, gots = [], []
    for bs in (1, 5, 33):
        x = np.random.default_rng(bs).standard_normal((bs, 1, 28, 28)).astype(np.float32)
        with torch.inference_mode():
            ref = tiny_resnet(torch.from_numpy(x)).numpy()
        got = ort.run(x)
        assert got.shape == (bs, 10)
        assert np.abs(ref - got).max() < 1e-4           # float kernels: 6e-7 measured (AVX-512 and AVX2)
        refs.append(ref)
        gots.append(got)
    # every input whose top-two gap exceeds twice the export's float error keeps its class: all 39 here
    assert_margin_agreement(np.concatenate(refs), np.concatenate(gots), min_decided=36)


def test_dynamo_exporter_matches_too(tiny_resnet, tmp_path):
    path = export_onnx(tiny_resnet, tmp_path / "d.onnx", (1, 28, 28), opset=18, exporter="dynamo")
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny_resnet(torch.from_numpy(x)).numpy()
    assert np.abs(create_backend("onnxruntime", path).run(x) - ref).max() < 1e-4


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_qdq_per_channel_is_close_to_fp32(onnx_fp32, tmp_path, method):
    from deploykit.data.fashion_mnist import MEAN, STD, load_fashion_mnist

    imgs = load_fashion_mnist("test").images
    x = ((imgs[:160].astype(np.float32) / 255 - MEAN) / STD)[:, None]
    calib, check = x[:128], x[128:]
    dst = quantize_onnx(onnx_fp32, tmp_path / "q.onnx", (calib[i:i + 32] for i in range(0, 128, 32)), method=method)
    q = count_qdq(dst)
    assert q["QuantizeLinear"] >= 10 and q["DequantizeLinear"] >= q["QuantizeLinear"]
    ref, got = create_backend("onnxruntime", onnx_fp32).run(check), create_backend("onnxruntime", dst).run(check)
    fid = fidelity(ref, got)
    # INT8 of this random-BN net on real images: 30.1 dB (percentile) to 30.5 dB (minmax, entropy) measured on
    # AVX-512 VNNI. ONNX Runtime's U8S8 math on 7-bit weights is exact integer math on VNNI and AVX2 alike, so
    # other CPUs differ by float rounding only. Doubling one conv's weight scale in the file gives 10.4-15.4 dB.
    assert fid["sqnr_db"] > 20, fid
    # each input judged against its own max logit error: all 32 keep their class when their gap exceeds twice it
    assert_margin_agreement(ref, got, min_decided=28, tol="per_input")


def test_reduce_range_auto_follows_the_int8_dot_product(monkeypatch):
    from deploykit import environment
    from deploykit.stages.quantize_onnx import resolve_reduce_range

    # another CPU's flags: the one thing here that cannot be the real machine
    for flags, seven_bit in ((["avx2"], True), (["avx2", "avx512f", "avx512_vnni"], False), (["avx2", "avx_vnni"], False),
                             (["avx2", "amx_tile", "amx_int8"], False)):
        monkeypatch.setattr(environment, "machine", lambda f=flags: {"cpu_flags": f})
        assert resolve_reduce_range("auto")[0] is seven_bit, flags
        assert resolve_reduce_range(True) == (True, "set in the recipe")
        assert resolve_reduce_range(False)[0] is False


def test_fp16_cast_parity(onnx_fp32, tmp_path):
    from deploykit.stages.cast_onnx import cast_fp16

    path = cast_fp16(onnx_fp32, tmp_path / "h.onnx")
    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    ref, got = create_backend("onnxruntime", onnx_fp32).run(x), create_backend("onnxruntime", path).run(x)
    # float32 in and out, half precision inside: every conv weight is stored as float16 (an unconverted model
    # would pass the SQNR bound with infinite SQNR)
    weights = [t for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    # fp16's 11-bit mantissa: 66.3 dB measured
    assert got.dtype == np.float32 and fidelity(ref, got)["sqnr_db"] > 40


def test_openvino_runs_the_same_onnx(onnx_fp32):
    pytest.importorskip("openvino")
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    ref = create_backend("onnxruntime", onnx_fp32).run(x)
    got = create_backend("openvino", onnx_fp32, threads=1).run(x)
    assert np.abs(ref - got).max() < 1e-3


def test_bn_synthesis_matches_bn_statistics(tiny_resnet):
    from deploykit.data.synthetic import synthesize_from_bn

    bns = [m for m in tiny_resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def bn_loss(x):
        stats = []
        hooks = [b.register_forward_hook(lambda m, i, o: stats.append(
            float((i[0].mean((0, 2, 3)) - m.running_mean).norm()
                  + (i[0].var((0, 2, 3), unbiased=False).add(1e-5).sqrt() - m.running_var.add(1e-5).sqrt()).norm())))
            for b in bns]
        with torch.inference_mode():
            tiny_resnet(torch.from_numpy(x))
        for h in hooks:
            h.remove()
        return sum(stats)

    noise = synthesize_from_bn(tiny_resnet, (1, 28, 28), n=8, steps=0)
    synth = synthesize_from_bn(tiny_resnet, (1, 28, 28), n=8, steps=40)
    assert synth.shape == (8, 1, 28, 28) and synth.dtype == np.float32
    # random BN statistics are not all reachable at once; measured: 190 -> 123 after 40 steps
    assert bn_loss(synth) < 0.8 * bn_loss(noise)
