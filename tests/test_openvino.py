"""OpenVINO backend and NNCF INT8: real ONNX files on real OpenVINO, compared with ONNX Runtime on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_margin_agreement, randomize_bn

timm = pytest.importorskip("timm")
pytest.importorskip("openvino")

from deploykit.backends import create_backend  # noqa: E402
from deploykit.backends.openvino_backend import save_ir  # noqa: E402
from deploykit.data.fashion_mnist import MEAN, STD, load_fashion_mnist  # noqa: E402
from deploykit.errors import ArtifactError  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.preprocessing import Preprocessing  # noqa: E402
from deploykit.stages.export_onnx import export_onnx  # noqa: E402
from deploykit.stages.quantize_openvino import quantize_openvino  # noqa: E402




@pytest.fixture(scope="module")
def images():
    """Real Fashion-MNIST test images, preprocessed: 200 for checks and 128 others for calibration."""
    pre = Preprocessing(input_size=(1, 28, 28), mean=(MEAN,), std=(STD,))
    test = load_fashion_mnist("test")
    idx = np.random.default_rng(1).permutation(len(test))
    return test.load(pre, np.sort(idx[:200])), test.load(pre, np.sort(idx[200:328]))


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)))
    return export_onnx(model, tmp_path_factory.mktemp("ov") / "model.fp32.onnx", (1, 28, 28))


def _run(backend, x, bs=64):
    return np.concatenate([backend.run(x[i:i + bs]) for i in range(0, len(x), bs)])


def test_openvino_fp32_matches_onnxruntime_on_real_images(onnx_fp32, images):
    x, _ = images
    ref = _run(create_backend("onnxruntime", onnx_fp32, threads=1), x)
    ov = create_backend("openvino", onnx_fp32, threads=1, precision="fp32")
    # f32 really applied: OpenVINO would otherwise run float layers in bf16 on a CPU that has it
    assert ov.applied["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov.info()["hint"] == "LATENCY" and ov.info()["threads"] == 1
    for bs in (1, 7, 64):  # the exported batch axis is dynamic; OpenVINO must honour every size
        got = _run(ov, x, bs)
        fid = fidelity(ref, got)
        # float kernels differ by ~1e-6 (7e-7 measured, AVX-512 and AVX2); bf16 would be ~1e-2 (8.6e-3 measured)
        assert fid["max_abs_logit_diff"] <= 1e-4 * max(1.0, float(np.abs(ref).max()))
        # every input whose top-two gap exceeds twice that error keeps its class: all 200 here (smallest gap 0.26)
        assert_margin_agreement(ref, got, min_decided=190)


def test_ir_is_the_same_model_as_the_onnx(onnx_fp32, images, tmp_path):
    x, _ = images
    xml = save_ir(onnx_fp32, tmp_path / "model.fp32.ov.xml")
    assert xml.with_suffix(".bin").stat().st_size > 4 * 100_000  # f32 weights kept (not halved to f16)
    a = _run(create_backend("openvino", onnx_fp32, threads=1), x[:32])
    b = _run(create_backend("openvino", xml, threads=1), x[:32])
    assert float(np.abs(a - b).max()) <= 1e-5 * max(1.0, float(np.abs(a).max()))


@pytest.mark.parametrize("fmt", ["ir", "onnx"])
def test_nncf_int8_agrees_with_fp32(onnx_fp32, images, tmp_path, fmt):
    x, calib = images
    dst = tmp_path / ("model.ov.xml" if fmt == "ir" else "model.nncf.int8.onnx")
    quantize_openvino(onnx_fp32, dst, calib, fmt=fmt, subset_size=128)
    ref = _run(create_backend("onnxruntime", onnx_fp32, threads=1), x)
    got = _run(create_backend("openvino", dst, threads=1, precision="int8"), x)
    fid = fidelity(ref, got)
    # measured (nncf 3.4, openvino 2026.4), both formats on these 200 images: 24.0 dB with OpenVINO's AVX-512 VNNI
    # kernels, 22.7-22.8 dB with its AVX2 kernels; one conv's weight scale doubled in the INT8 file gives 17.3 dB
    # (the stem) to 8.7 dB (a middle conv)
    assert fid["sqnr_db"] >= 18.0, fid
    # INT8 error has a long tail (max 0.20, mean 0.02), so each input is judged against its own max error: inputs
    # whose top-two gap exceeds twice it keep their class; 191-192 of 200 are decided on both ISAs
    assert_margin_agreement(ref, got, min_decided=170, tol="per_input")
    assert not np.allclose(ref, got, atol=1e-5)  # it really is a different (quantized) model


def test_ir_without_weights_is_a_one_line_error(onnx_fp32, tmp_path):
    xml = save_ir(onnx_fp32, tmp_path / "m.xml")
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ArtifactError, match=r"no weights file m\.bin\. Fix: copy the \.bin"):
        create_backend("openvino", xml)
    with pytest.raises(ArtifactError, match="does not exist"):
        create_backend("openvino", tmp_path / "missing.onnx")
