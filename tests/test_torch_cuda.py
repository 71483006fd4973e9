"""The torch-cuda runtime, `compress --target gpu`, `bench --device cuda` and the H200 script, on a machine without a GPU.

No GPU exists here, so the CUDA-only parts (pinned staging, torch.compile with inductor, CUDA-graph replay, CUDA
events) are not exercised: the same code runs with ``device="cpu"``, the selection logic is tested with
``torch.cuda.is_available`` monkeypatched, and the CUDA-event clock with a host-clock stand-in for its events.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploykit.artifact import Artifact
from deploykit.errors import DeployKitError, ParityError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()
                                and not os.environ.get("DEPLOYKIT_FASHION_MNIST_DIR"),
                                reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")


def _no_gpu_here() -> None:
    from deploykit.gpu import cuda_unavailable

    if cuda_unavailable() is None:
        pytest.skip("this machine has a GPU: these tests are about the machine without one")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """bench/gpu/h200.py --device cpu --dry on the Fashion-MNIST reference: its result, output dir and artifact."""
    out = tmp_path_factory.mktemp("h200")
    spec = importlib.util.spec_from_file_location("h200", REPO / "bench/gpu/h200.py")
    h200 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h200)
    code = h200.main(["--device", "cpu", "--dry", "--out", str(out / "out"), "--refs", "resnet10t_fmnist",
                      "--work", str(out / "work")])
    result = json.loads((out / "out" / "h200.json").read_text())
    return {"code": code, "result": result, "out": out / "out", "artifact": out / "work" / "resnet10t_fmnist.deploykit"}


def test_h200_script_dry_mode_runs_every_section(dry):
    r = dry["result"]
    assert dry["code"] == 0 and r["errors"] == {} and r["skipped"] == {}
    assert r["mode"] == "dry" and r["device"] == "cpu"
    ref = r["sections"]["refs"]["resnet10t_fmnist"]
    # compress --target gpu checked both precisions against FP32 on held-out real images
    assert ref["build"]["checked_on"] == "cpu" and ref["build"]["rebuilt_fp32_max_abs_diff"] < 1e-4
    assert {p: f["passed"] for p, f in ref["build"]["parity"].items()} == {"fp16": True, "bf16": True}
    rows = {s["variant"]: s for s in ref["summary"]}
    assert set(rows) == {"torch-cuda-cpu/fp32", "torch-cuda-cpu/fp16", "torch-cuda-cpu/bf16",
                         "torch-cuda[compile]/fp16", "torch-cuda[compile]/bf16"}
    fp32 = rows["torch-cuda-cpu/fp32"]["top1"]
    assert fp32 >= 70.0  # the reference model scores 89% on the whole test split; 32 images here
    for name, s in rows.items():
        # same weights at fp16/bf16 (>= 40/25 dB SQNR): at most 2 of the 32 images may flip
        assert abs(s["top1"] - fp32) <= 2 * 100 / 32 + 1e-9, name
        assert s["best_batch"] in (1, 2) and s["bs1_p50_ms"] > 0
    bench = json.loads((dry["out"] / "resnet10t_fmnist" / "bench.json").read_text())
    assert bench["settings"]["batch_sizes"] == [1, 2]  # --batch auto with --max-batch 2
    assert all((dry["out"] / "resnet10t_fmnist" / f"pareto_bs{b}.png").is_file() for b in (1, 2))
    r50 = r["sections"]["r50"]
    assert {(c["mode"], c["precision"]) for c in r50["configs"]} == {
        ("eager", "fp16"), ("eager", "bf16"), ("compile", "fp16"), ("compile", "bf16")}
    assert all(c["throughput_ips"] > 0 and c["runtime"]["device"] == "cpu" for c in r50["configs"])
    assert r50["goal_met"] is None  # a CPU dry run never claims the GPU goal
    assert (dry["out"] / "r50_throughput.png").is_file() and "Dry run on the CPU" in (dry["out"] / "h200.md").read_text()


def test_gpu_artifact_records_the_torch_cuda_runtime_and_its_alternatives(dry):
    art = Artifact.open(dry["artifact"])
    rt = art.runtime
    assert (rt["backend"], rt["model"], rt["precision"], rt["target"]) == ("torch-cuda", "model.torch.pth", "fp16", "gpu")
    assert rt["files"] == {"torch-cuda": "model.torch.pth", "onnxruntime": "model.onnx", "tensorrt": "model.onnx"}
    assert art.verify() == []  # model.torch.pth is hashed in the manifest like every other file


def test_selection_torch_cuda_only_with_a_gpu_and_target_gpu(dry, monkeypatch):
    """Monkeypatching torch.cuda.is_available is acceptable here: a GPU cannot exist on this machine, and the
    decision is all that is tested (creating the CUDA backend is not attempted)."""
    import torch

    from deploykit.backends import torch_cuda_backend as tcb

    _no_gpu_here()
    art = Artifact.open(dry["artifact"])
    cpu_rt = {"backend": "onnxruntime", "target": "cpu", "precision": "int8"}
    assert tcb.gpu_artifact_backend(cpu_rt, cuda_available=True) == ("onnxruntime", {})  # target decides first
    assert tcb.gpu_artifact_backend(art.runtime, cuda_available=True) == ("torch-cuda", {})
    assert art.default_backend() == ("onnxruntime", {"device": "gpu", "precision": "fp16"})  # this machine
    assert art.served_files() == ["model.onnx", "preprocessing.json"]

    made = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("deploykit.backends.create_backend",
                        lambda name, model, **kw: made.update(name=name, model=Path(model).name, **kw))
    assert art.default_backend() == ("torch-cuda", {})
    art.backend()
    assert made == {"name": "torch-cuda", "model": "model.torch.pth", "threads": None, "precision": "fp16"}
    assert art.served_files() == ["model.torch.pth", "preprocessing.json"]


def test_fallback_runtime_agrees_with_the_torch_runtime_on_real_images(dry):
    """Without a GPU the artifact runs its fp16 ONNX on ONNX Runtime; the torch runtime (on the CPU) computes the
    same function: both are fp16 models of the same FP32 weights, so their logits agree to fp16 precision."""
    from deploykit.backends import create_backend
    from deploykit.data.fashion_mnist import load_fashion_mnist
    from deploykit.evaluate import fidelity

    _no_gpu_here()
    art = Artifact.open(dry["artifact"])
    x = load_fashion_mnist("test").head(64, seed=3).load(art.preprocessing, np.arange(64))
    ort = art.backend()
    assert ort.name == "onnxruntime" and ort.info()["providers"] == ["CPUExecutionProvider"]
    torch_fp16 = create_backend("torch-cuda", art.model_path("model.torch.pth"), precision="fp16", device="cpu")
    assert torch_fp16.info()["device"] == "cpu" and torch_fp16.info()["compile"] is False
    # two independent fp16 roundings of the same network (each >= 40 dB from FP32): >= 37 dB from each other
    assert fidelity(ort.run(x), torch_fp16.run(x))["sqnr_db"] >= 37.0


def _stage_state(art: Artifact, workdir: Path, n: int = 256):
    import torch

    from deploykit.data.fashion_mnist import load_fashion_mnist
    from deploykit.stages import PipelineState
    from deploykit.stages.state import StageInputs
    from deploykit.torch_model_io import load_torch_model, read_header

    model = load_torch_model(art.model_path("model.torch.pth"))
    x = load_fashion_mnist("test").head(n, seed=5).load(art.preprocessing, np.arange(n))
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    state = PipelineState(model=model, teacher=model, preprocessing=art.preprocessing, workdir=workdir,
                          inputs=StageInputs(check_fn=lambda: x), log=lambda s: None,
                          model_kwargs=read_header(art.model_path("model.torch.pth"))["model_kwargs"])
    state.onnx_fp32_path = art.path / "model.fp32.onnx"
    state.reference_check_logits(ref)
    return state


def test_export_torch_fp16_bf16_parity_on_real_images(dry, tmp_path):
    """SQNR vs FP32 on 256 real Fashion-MNIST test images. The bounds (stages/export_torch.py): one rounding to a
    p-bit significand is at most 2^-p relative (fp16 ~-66 dB, bf16 ~-48 dB); a few dozen layers add ~15-17 dB;
    measured 62.5 / 43.9 dB on this model. 40 / 25 dB leave room for other kernels; a wrong weight, a layer in the
    wrong type or an fp16 overflow lands far below."""
    from deploykit.stages.export_torch import ExportTorch

    state = _stage_state(Artifact.open(dry["artifact"]), tmp_path)
    facts = ExportTorch().run(state)
    assert facts["checked_on"] == "cpu" and facts["inputs"] == 256
    assert facts["rebuilt_fp32"]["max_abs_logit_diff"] < 1e-3  # the same weights rebuilt: float rounding only
    fp16, bf16 = facts["precisions"]["fp16"], facts["precisions"]["bf16"]
    assert fp16["sqnr_db"] >= 40.0 and bf16["sqnr_db"] >= 25.0
    assert fp16["sqnr_db"] > bf16["sqnr_db"] + 10  # 3 more significand bits: ~18 dB in theory
    assert fp16["top1_agreement"] >= 99.0 and bf16["top1_agreement"] >= 98.0
    assert state.runtime.backend == "torch-cuda" and state.precision == "fp16"
    assert (tmp_path / "model.torch.pth").is_file()


def test_export_torch_refuses_the_shipped_precision_below_its_bound(dry, tmp_path):
    from deploykit.stages.export_torch import ExportTorch

    art = Artifact.open(dry["artifact"])
    cfg = ExportTorch.Config(min_sqnr_db_fp16=200.0)
    with pytest.raises(ParityError, match=r"fp16 torch model: SQNR \d+\.\d dB vs FP32 on 64 held-out inputs, below "
                                          r"the 200 dB bound\. Fix: ship fp32"):
        ExportTorch(cfg).run(_stage_state(art, tmp_path, 64))
    # a precision that is only reported (not shipped) fails softly: recorded, not raised
    state = _stage_state(art, tmp_path, 64)
    facts = ExportTorch(ExportTorch.Config(min_sqnr_db_bf16=200.0)).run(state)
    assert facts["precisions"]["bf16"]["passed"] is False and facts["precisions"]["fp16"]["passed"] is True


def test_pruned_and_fused_model_rebuilds_exactly(tmp_path):
    import timm
    import torch

    from deploykit.stages.fuse_bn import fuse_conv_bn
    from deploykit.stages.prune import prune_model
    from deploykit.torch_model_io import load_torch_model, save_torch_model

    torch.manual_seed(0)
    kw = {"channels": (16, 32, 64, 128)}
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, **kw).eval()
    model, _ = prune_model(model, (1, 28, 28), ratio=0.5, round_to=8)
    model, pairs = fuse_conv_bn(model)
    assert pairs > 0
    save_torch_model(model, tmp_path / "m.pth", in_chans=1, input_size=(1, 28, 28), model_kwargs=kw)
    rebuilt = load_torch_model(tmp_path / "m.pth")
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), rebuilt(x))
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_backend_settings_are_checked():
    from deploykit.backends import BACKENDS, create_backend

    _no_gpu_here()
    import torch

    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    tiny(torch.zeros(1, 1, 8, 8))
    with pytest.raises(DeployKitError, match="cuda_graphs needs a CUDA device, this backend runs on cpu"):
        create_backend("torch-cuda", tiny, device="cpu", cuda_graphs=True)
    with pytest.raises(DeployKitError, match="precision 'int8' is not one of fp32, fp16, bf16"):
        create_backend("torch-cuda", tiny, device="cpu", precision="int8")
    cls = BACKENDS.get("torch-cuda")
    assert cls.unavailable(device="cpu") is None
    assert "sees no CUDA GPU" in cls.unavailable() and "sees no CUDA GPU" in cls.unavailable(device="cuda")
    be = create_backend("torch-cuda", tiny, device="cpu", precision="bf16")
    assert be.run(np.zeros((3, 1, 8, 8), np.float32)).dtype == np.float32 and be.info()["pinned_staging"] is False


def test_bench_device_cuda_without_gpu_is_one_line_and_exit_2(dry, tmp_path):
    _no_gpu_here()
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "deploykit", "bench", str(dry["artifact"]), "--device", "cuda",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: torch ") and "sees no CUDA GPU" in lines[0]
    assert "Fix: run on a machine with an NVIDIA GPU" in lines[0] and not out.exists()


def test_bench_gpu_names_skip_with_the_cuda_reason(dry):
    from deploykit.benchmark import BenchError, batch_sweep, check_device, discover_variants

    _no_gpu_here()
    variants, skipped = discover_variants(dry["artifact"], ["torch-cuda", "torch-cuda-compile", "torch-cuda-cpu"])
    assert [v.name for v in variants] == ["torch-cuda-cpu/fp32", "torch-cuda-cpu/fp16", "torch-cuda-cpu/bf16"]
    assert [v.deployed for v in variants] == [False, False, False]  # the deployed runtime is torch-cuda on a GPU
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert set(reasons) == {"torch-cuda/fp16", "torch-cuda-compile/fp16"}
    assert all("sees no CUDA GPU" in why for why in reasons.values())
    assert check_device("cpu", "torch") == "torch"
    with pytest.raises(BenchError, match="--device 'tpu' is not cpu or cuda"):
        check_device("tpu", None)
    assert batch_sweep(1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] and batch_sweep(100)[-1] == 64


def test_cuda_clock_reads_cuda_events(monkeypatch):
    """The 'cuda' clock with a host-clock stand-in for torch.cuda.Event (no GPU here): the plumbing through
    time_variants and paired_ratios, not CUDA itself."""
    import torch

    from deploykit.measure import paired_ratios, time_variants, with_planted_slowdown

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):  # milliseconds, like torch.cuda.Event
            return (end.t - self.t) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    run = time_variants({"a": lambda x: time.sleep(0.003)}, np.zeros((2, 1)), max_rounds=2, clock="cuda")
    rec = run.records["a"]
    assert rec.clock == "cuda" and rec.to_dict()["clock"] == "cuda" and rec.batch_size == 2
    assert 3.0 <= rec.p50 < 10.0  # sleep never returns early
    m = paired_ratios(lambda: time.sleep(0.004), lambda: time.sleep(0.001), seconds=0.1, min_rounds=6, warmup=1,
                      warmup_s=0.0, clock="cuda")
    assert np.median(m["ratios"]) > 1.5 and min(m["candidate_ms"]) >= 4.0
    with pytest.raises(ValueError, match="spins on a host clock"):
        with_planted_slowdown(lambda: None, 0.1, clock="cuda")
    with pytest.raises(ValueError, match="time_variants clock 'cpu'"):
        time_variants({"a": lambda x: None}, np.zeros((1, 1)), clock="cpu")
