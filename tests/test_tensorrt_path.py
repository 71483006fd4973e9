"""The TensorRT path: what runs here is tested for real; what needs a GPU is marked `gpu` and skipped.

Real here: nvidia-modelopt's ONNX PTQ of a timm model on real Fashion-MNIST images, the Q/DQ graph run by
ONNX Runtime CPU, the structural check on that graph and on hand-broken copies of it, engine.json
compatibility logic on recorded (fabricated) environments, and the "no TensorRT" paths of the stage,
backend and CLI. Never mocked: TensorRT itself, which cannot be installed on these machines.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import randomize_bn

timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")

from deploykit.backends import create_backend  # noqa: E402
from deploykit.evaluate import fidelity  # noqa: E402
from deploykit.onnx_checks import QdqCheckError, check_qdq_placement  # noqa: E402
from deploykit.backends.tensorrt_engine import (EngineMismatchError, TensorRTUnavailable,  # noqa: E402
                                                build_engine, check_engine_compatible, ensure_engine,
                                                gpu_environment, tensorrt_status)
from deploykit.stages.export_onnx import export_onnx  # noqa: E402
from deploykit.stages.fuse_bn import fuse_conv_bn  # noqa: E402
from deploykit.stages.quantize_tensorrt import modelopt_available, quantize_for_tensorrt  # noqa: E402

HAVE_TRT = tensorrt_status()[0] is not None
HAVE_GPU = gpu_environment()["gpu"] is not None
gpu = pytest.mark.gpu
needs_trt_gpu = pytest.mark.skipif(not (HAVE_TRT and HAVE_GPU),
                                   reason="needs TensorRT and an NVIDIA GPU (neither exists on the CPU build machines)")




@pytest.fixture(scope="module")
def images():
    from deploykit.data.fashion_mnist import MEAN, STD, load_fashion_mnist

    imgs = load_fashion_mnist("test").images[:384]
    x = ((imgs.astype(np.float32) / 255 - MEAN) / STD)[:, None]
    return x[:256], x[256:]          # calibration, held-out check


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)))
    fused, _ = fuse_conv_bn(model)
    return export_onnx(fused, tmp_path_factory.mktemp("trt") / "m.onnx", (1, 28, 28))


@pytest.fixture(scope="module")
def onnx_trt_int8(onnx_fp32, images):
    if not modelopt_available()[0]:
        pytest.skip(f"nvidia-modelopt unusable here: {modelopt_available()[1]}")
    dst = onnx_fp32.with_name("m.int8.onnx")
    used = quantize_for_tensorrt(onnx_fp32, dst, images[0], tool="modelopt", method="max")
    assert used["tool"] == "modelopt"
    return dst


# ---- the TensorRT-target INT8 graph, run and checked on this machine ---------------------------------

def test_trt_int8_onnx_runs_on_onnxruntime_cpu_close_to_fp32(onnx_fp32, onnx_trt_int8, images):
    check = images[1]
    ref = create_backend("onnxruntime", onnx_fp32, threads=1).run(check)
    got = create_backend("onnxruntime", onnx_trt_int8, threads=1).run(check)
    fid = fidelity(ref, got)
    # Symmetric INT8 (max calibration), random-BN resnet10t, real images: measured 20.6 dB, 100% agreement
    assert fid["sqnr_db"] > 17, fid
    assert fid["top1_agreement"] >= 90.0, fid


def test_structural_check_passes_on_modelopt_graph(onnx_trt_int8):
    r = check_qdq_placement(onnx_trt_int8)
    assert r["ok"] and r["problems"] == []
    # resnet10t: 3 stem convs + 4 stages x (2 convs + downsample) = 15 Convs, all INT8
    assert r["counts"]["Conv"] == 15 and r["counts"]["quantized"] == 15
    # the 10-class head (128x10) is left float by design: INT8 tensor cores need K, N >= 16
    assert list(r["float_by_rule"]) == ["/fc/Gemm"] and "< 16" in r["float_by_rule"]["/fc/Gemm"]
    with pytest.raises(QdqCheckError, match=r"Gemm '/fc/Gemm': activation and weight not quantized"):
        check_qdq_placement(onnx_trt_int8, small_gemm_dim=0)


def _first(g, op, pred=lambda n: True):
    return next(n for n in g.node if n.op_type == op and pred(n))


def _break_activation(m):
    """Feed a Conv the float tensor in front of its Q/DQ pair: the Conv would run in float on TensorRT."""
    g = m.graph
    conv = [n for n in g.node if n.op_type == "Conv"][4]
    dq = _first(g, "DequantizeLinear", lambda n: n.output[0] == conv.input[0])
    q = _first(g, "QuantizeLinear", lambda n: n.output[0] == dq.input[0])
    conv.input[0] = q.input[0]
    return rf"Conv '{conv.name}': activation not quantized"


def _break_dangling(m):
    """Delete a DequantizeLinear and wire its consumers to the QuantizeLinear's float input: Q left dangling."""
    g = m.graph
    dq = _first(g, "DequantizeLinear", lambda n: "Relu" in n.name)
    q = _first(g, "QuantizeLinear", lambda n: n.output[0] == dq.input[0])
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == dq.output[0]:
                n.input[i] = q.input[0]
    g.node.remove(dq)
    return rf"QuantizeLinear '{q.name}' output is not consumed by a DequantizeLinear \(dangling\)"


def _break_per_channel(m):
    """Replace a Conv's per-channel weight scale with one per-tensor scale (its Q and DQ share the scale)."""
    g = m.graph
    dq = _first(g, "DequantizeLinear", lambda n: n.name.endswith("weight_DequantizeLinear"))
    for t in g.initializer:
        if t.name == dq.input[1]:
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(onnx.numpy_helper.to_array(t).max(), np.float32), t.name))
    return r"weight scale has shape \[\] on axis 0; expected per-channel \(\d+,\) on axis 0"


def _break_zero_point(m):
    """An asymmetric activation zero point: TensorRT supports symmetric INT8 only."""
    g = m.graph
    dq = _first(g, "DequantizeLinear", lambda n: "Relu" in n.name)
    for t in g.initializer:
        if t.name == dq.input[2]:
            t.CopyFrom(onnx.numpy_helper.from_array(np.array(3, np.int8), t.name))
    return r"has a non-zero zero point \(asymmetric\)"


@pytest.mark.parametrize("breaker", [_break_activation, _break_dangling, _break_per_channel, _break_zero_point])
def test_structural_check_fails_on_hand_broken_graph(onnx_trt_int8, breaker):
    m = onnx.load(str(onnx_trt_int8))
    expected = breaker(m)
    with pytest.raises(QdqCheckError, match=expected):
        check_qdq_placement(m)
    report = check_qdq_placement(m, raise_on_failure=False)
    assert not report["ok"] and report["problems"]


def test_cpu_int8_graph_is_rejected_as_not_tensorrt_ready(onnx_fp32, images, tmp_path):
    """The CPU recipe's graph (U8 asymmetric activations) is fast on VNNI CPUs but not what TensorRT builds."""
    from deploykit.stages.quantize_onnx import quantize_onnx

    calib = images[0][:64]
    dst = quantize_onnx(onnx_fp32, tmp_path / "cpu.onnx", (calib[i:i + 32] for i in range(0, 64, 32)))
    with pytest.raises(QdqCheckError, match=r"^Q/DQ graph is not TensorRT-ready: .* \(and \d+ more\)\. Fix: "):
        check_qdq_placement(dst)
    problems = check_qdq_placement(dst, raise_on_failure=False)["problems"]
    assert any("zero point is UINT8, TensorRT needs INT8" in p for p in problems)      # asymmetric U8 activations
    assert any("zero point is INT32, TensorRT needs INT8" in p for p in problems)      # INT32 bias DQ


def test_onnxruntime_fallback_makes_a_tensorrt_ready_graph(onnx_fp32, images, tmp_path):
    dst = tmp_path / "ort.int8.onnx"
    used = quantize_for_tensorrt(onnx_fp32, dst, images[0][:128], tool="onnxruntime", method="max")
    assert used["tool"] == "onnxruntime"
    r = check_qdq_placement(dst, small_gemm_dim=0)   # ORT quantizes the head too
    assert r["ok"] and r["counts"]["quantized"] == 16
    fid = fidelity(create_backend("onnxruntime", onnx_fp32).run(images[1]), create_backend("onnxruntime", dst).run(images[1]))
    # S8 symmetric activations after ReLU use half the range: measured 10.3 dB here vs 20.6 dB for modelopt
    assert fid["sqnr_db"] > 8 and fid["top1_agreement"] >= 90.0, fid


# ---- engine.json: detected before deserializing -------------------------------------------------------

BUILT = {"schema": 1, "engine": "model.engine", "onnx": "model.onnx", "precision": "int8", "tensorrt": "10.3.0",
         "cuda_runtime": "12.6", "driver": "560.35.03", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "hardware_compatibility": "none", "version_compatible": False, "batch": {"min": 1, "opt": 8, "max": 64}}
SAME = {"tensorrt": "10.3.0", "cuda_runtime": "12.6", "driver": "560.35.03", "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0", "gpu_error": None}


def test_engine_json_matching_environment_is_compatible():
    assert check_engine_compatible(BUILT, SAME) == []


@pytest.mark.parametrize("change, message", [
    ({"tensorrt": "10.7.0"}, r"engine model\.engine was built with TensorRT 10\.3\.0, this machine runs 10\.7\.0\. Fix: rebuild"),
    ({"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
     r"built for compute capability 9\.0 \(NVIDIA H100 80GB HBM3\), this GPU is 8\.0 \(NVIDIA A100-SXM4-80GB\)"),
    ({"tensorrt": None}, r"TensorRT is not available here \(engine model\.engine needs TensorRT 10\.3\.0\)"),
    ({"gpu": None, "compute_capability": None}, r"no NVIDIA GPU visible here"),
])
def test_engine_json_mismatch_is_a_clear_error(change, message):
    with pytest.raises(EngineMismatchError, match=message):
        check_engine_compatible(BUILT, {**SAME, **change})
    lines = check_engine_compatible(BUILT, {**SAME, **change}, raise_on_mismatch=False)
    assert lines and all(line.startswith("mismatch: ") for line in lines)


def test_same_compute_capability_other_gpu_only_warns():
    lines = check_engine_compatible(BUILT, {**SAME, "gpu": "NVIDIA H200", "driver": "570.86.10"})
    assert lines == ["warning: engine tuned on NVIDIA H100 80GB HBM3, running on NVIDIA H200 (same compute "
                     "capability: it loads, but rebuild for best speed)",
                     "warning: driver 570.86.10 differs from build driver 560.35.03"]


def test_version_compatible_engine_tolerates_other_tensorrt():
    assert check_engine_compatible({**BUILT, "version_compatible": True}, {**SAME, "tensorrt": "10.7.0"}) == []


def test_foreign_engine_is_refused_before_deserializing(tmp_path):
    """On this machine: the backend raises the engine.json mismatch, never reaching `import tensorrt`."""
    (tmp_path / "model.engine").write_bytes(b"not an engine: deserializing it would crash TensorRT")
    (tmp_path / "engine.json").write_text(json.dumps(BUILT))
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    expected = "TensorRT is not available here" if not HAVE_TRT else "built with TensorRT 10.3.0"
    with pytest.raises(EngineMismatchError, match=expected):
        create_backend("tensorrt", tmp_path / "model.onnx")
    # asked to rebuild, it refuses when the stored ONNX is not the one the engine was built from
    (tmp_path / "engine.json").write_text(json.dumps({**BUILT, "onnx_sha256": "0" * 64}))
    with pytest.raises(EngineMismatchError, match=r"and model\.onnx changed since the engine was built"):
        ensure_engine(tmp_path / "model.engine", rebuild_on_mismatch=True, running={**SAME, "tensorrt": "10.7.0"})


def test_missing_engine_says_how_to_build_it(tmp_path):
    with pytest.raises(Exception, match=r"no TensorRT engine at .*model\.engine.*Fix: build one: `deploykit build-engine"):
        create_backend("tensorrt", tmp_path / "model.onnx")


@pytest.mark.skipif(HAVE_TRT, reason="checks the 'TensorRT missing' path")
def test_build_engine_without_tensorrt_says_why_and_how(onnx_fp32, tmp_path):
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed .*Fix: on a machine with an NVIDIA GPU"):
        build_engine(onnx_fp32, tmp_path / "model.engine", "fp16")
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.skipif(HAVE_TRT and HAVE_GPU, reason="checks the skip path of machines without TensorRT/GPU")
def test_build_engine_stage_skips_or_fails_as_configured(onnx_fp32, tmp_path):
    from deploykit.stages import STAGES, PipelineState

    state = PipelineState(model=None, teacher=None, preprocessing=None, workdir=tmp_path, onnx_path=onnx_fp32,
                          log=lambda s: None)
    stage = STAGES.get("build_engine")
    facts = stage(stage.Config(if_unavailable="skip")).run(state)
    assert facts["skipped"] is True and ("TensorRT" in facts["reason"] or "GPU" in facts["reason"])
    assert not (tmp_path / "model.engine").exists()
    with pytest.raises(TensorRTUnavailable):
        stage(stage.Config(if_unavailable="fail")).run(state)


def test_check_engine_cli_exit_codes(tmp_path):
    (tmp_path / "engine.json").write_text(json.dumps(BUILT))
    res = subprocess.run([sys.executable, "-m", "deploykit", "check-engine", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: ") and "Fix: rebuild the engine on this machine" in res.stderr
    res = subprocess.run([sys.executable, "-m", "deploykit", "check-engine", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no engine.json in" in res.stderr


# ---- ONNX Runtime provider fallback and doctor --------------------------------------------------------

def test_onnxruntime_provider_fallback_order_and_reason(onnx_fp32):
    from deploykit.backends.onnxruntime_backend import select_providers

    full = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("gpu", full) == (full, "TensorrtExecutionProvider first")
    assert select_providers("gpu", full[1:]) == (full[1:], "CUDAExecutionProvider first (TensorrtExecutionProvider "
                                                           "not in this onnxruntime)")
    providers, why = select_providers("gpu", ["CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"] and "install onnxruntime-gpu" in why
    be = create_backend("onnxruntime", onnx_fp32, threads=1, device="gpu")   # the int8-tensorrt artifact's setting
    info = be.info()
    if not HAVE_GPU:
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["provider_reason"].startswith(("CPU only", "TensorrtExecutionProvider failed", "CUDAExecutionProvider failed"))


def test_doctor_reports_this_machine():
    import onnxruntime

    from deploykit.doctor import run_checks

    checks = {c.name: c for c in run_checks()}
    assert checks["onnxruntime"].version == onnxruntime.__version__
    assert checks["tensorrt"].ok is HAVE_TRT and checks["cuda"].ok is HAVE_GPU
    for c in checks.values():
        assert c.ok or (c.why and c.fix), c   # every missing piece says why and how
    assert checks["nvidia-modelopt"].ok is modelopt_available()[0]


# ---- the whole recipe, through the one entry point ------------------------------------------------------

@pytest.mark.slow
def test_compress_int8_tensorrt_recipe_end_to_end(tmp_path):
    from deploykit.api import compress
    from deploykit.checkpoint import save_timm_checkpoint

    torch.manual_seed(0)
    kw = {"channels": [16, 32, 64, 128]}
    model = randomize_bn(timm.create_model("resnet10t", num_classes=10, in_chans=1, **kw))
    save_timm_checkpoint(tmp_path / "t.pth", arch="resnet10t", state_dict=model.state_dict(),
                         args={"num_classes": 10, "in_chans": 1, "model_kwargs": kw, "input_size": [1, 28, 28]})
    res = compress(tmp_path / "t.pth", "int8-tensorrt", out=tmp_path / "t.deploykit", data__name="fashion-mnist",
                   data__eval_images=500, data__calibration_images=256, eval__latency_batch_sizes=[1])
    facts = res.report["stage_facts"]
    assert facts["quantize_tensorrt"]["structure"]["ok"] is True
    assert facts["build_engine"]["skipped"] is (not (HAVE_TRT and HAVE_GPU))
    assert res.manifest["runtime"]["target"] == "tensorrt" and res.manifest["runtime"]["precision"] == "int8"
    check_qdq_placement(res.path / "model.onnx")
    # `deploykit build-engine` on it: the artifact and its Q/DQ graph are accepted, then TensorRT is required
    cli = subprocess.run([sys.executable, "-m", "deploykit", "build-engine", str(res.path), "--precision", "int8"],
                         capture_output=True, text=True, timeout=300)
    if not HAVE_TRT:
        assert cli.returncode == 2 and cli.stderr.startswith("error: TensorRT is not installed"), cli.stderr


# ---- GPU only: run where TensorRT and a GPU exist ---------------------------------------------------------

@gpu
@needs_trt_gpu
def test_gpu_int8_engine_matches_onnxruntime(onnx_trt_int8, images, tmp_path):
    import shutil

    shutil.copy(onnx_trt_int8, tmp_path / "model.onnx")
    cache = tmp_path / "timing.cache"
    info = build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", "int8", min_batch=1, opt_batch=8,
                        max_batch=64, timing_cache=cache)
    assert info["tensorrt"] == tensorrt_status()[0] and info["gpu"] and cache.is_file()
    be = create_backend("tensorrt", tmp_path / "model.onnx")
    ref = create_backend("onnxruntime", onnx_trt_int8).run(images[1][:64])
    fid = fidelity(ref, be.run(images[1][:64]))
    assert fid["top1_agreement"] >= 95.0, fid
    lat = be.device_latency_ms(images[1][:8], runs=50)
    assert lat["p50"] > 0
    again = build_engine(tmp_path / "model.onnx", tmp_path / "model2.engine", "int8", timing_cache=cache)
    assert again["timing_cache"]["reused"] is True


@gpu
@needs_trt_gpu
def test_gpu_fp16_engine_matches_fp32(onnx_fp32, images, tmp_path):
    import shutil

    shutil.copy(onnx_fp32, tmp_path / "model.onnx")
    build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", "fp16", max_batch=32)
    ref = create_backend("onnxruntime", onnx_fp32).run(images[1][:32])
    got = create_backend("tensorrt", tmp_path / "model.engine").run(images[1][:32])
    assert fidelity(ref, got)["sqnr_db"] > 30
