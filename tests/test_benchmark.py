"""`deploykit bench` on a real (tiny) artifact: bench.json schema, numbers that must agree, the PNG, the gate CLI.

Everything runs for real: torch, ONNX Runtime and OpenVINO on real Fashion-MNIST test images, the
`deploykit` command as a subprocess. Timings are only checked for consistency (p50 <= p90 <= p99,
throughput = batch / p50), never against absolute values: this machine is shared.

Numerics are compared without near-tie checks: the tiny model has random weights, so many of its top-2
logits are close, and float/INT8 kernels differ between AVX2, AVX-512 VNNI and AMX. Float variants are held
to a max-abs-error bound and to *margin-aware* agreement (only inputs whose reference top-2 gap exceeds twice
the measured error can be counted: there no rounding can flip the prediction); INT8 variants to SQNR bounds.
"""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from deploykit import compress  # noqa: E402
from deploykit.benchmark import (BENCH_SCHEMA, BenchError, bench_backends, default_backends,  # noqa: E402
                                 discover_variants, eval_data, known_backends, parse_backends, parse_batches,
                                 run_benchmark, write_bench)
from deploykit.evaluate import fidelity, predict  # noqa: E402
from deploykit.gate import BASELINE_SCHEMA, GateError, load_baseline, make_baseline, with_planted_slowdown  # noqa: E402
from deploykit.plots import pareto_front  # noqa: E402

RECIPE = """
version: 1
name: bench-test
stages:
  - fuse_bn
  - export_onnx: {opset: 17}
  - quantize_onnx: {method: minmax, per_channel: true}
eval: {enabled: false}
"""
CLI = [sys.executable, "-m", "deploykit"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny random-weight resnet10t compressed to INT8 with real calibration and 200 eval images."""
    from helpers import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("bench")
    ckpt = save_tiny_checkpoint(root / "tiny.pth")
    recipe = root / "bench-test.yaml"  # the INT8 path without runtime selection: seconds, not minutes
    recipe.write_text(RECIPE)
    res = compress(ckpt, recipe, out=root / "tiny.deploykit", data__name="fashion-mnist", data__eval_images=200,
                   data__calibration_images=64)
    return res.path


@pytest.fixture(scope="module")
def result(artifact):
    # 1 thread: on a loaded 2-core box, 2-thread OpenMP/ORT pools spin against each other (docs/benchmarks.md)
    return run_benchmark(artifact, ["torch", "onnxruntime", "openvino"], [1, 4], eval_images=200, runs=5,
                         warmup=1, budget_s=1.0, threads=1, log=lambda s: None)


@pytest.fixture(scope="module")
def logits(artifact):
    """Logits of the bench's own CPU variants on its 200 evaluation images (same threads and batches as `result`)."""
    from deploykit.artifact import Artifact

    eval_set, pre = eval_data(Artifact.open(artifact), "auto", 200)
    variants, _ = discover_variants(artifact, ["torch", "onnxruntime", "openvino"], threads=1)
    out = {}
    for v in variants:
        try:
            out[v.name] = predict(v.make(), eval_set, pre, 64)
        except RuntimeError:  # e.g. openvino/bf16 where oneDNN is capped below the CPU's BF16 ISA
            pass
    return out


def _top2_gap(logits):
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def test_bench_json_schema(result, tmp_path):
    paths = write_bench(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == BENCH_SCHEMA
    assert set(data) >= {"created", "machine", "machine_line", "versions", "threads", "settings", "variants",
                         "skipped", "peak_rss_mb", "artifact", "load_average"}
    assert data["settings"]["batch_sizes"] == [1, 4] and data["settings"]["eval_images"] == 200
    assert data["machine"]["cpu_flags"] == result["machine"]["cpu_flags"]
    assert {"onnxruntime", "openvino", "torch"} <= set(data["versions"])
    names = [v["name"] for v in data["variants"]]
    assert {"torch/fp32", "onnxruntime/fp32", "onnxruntime/int8", "openvino/fp32", "openvino/int8"} <= set(names)
    for v in data["variants"]:
        assert set(v) >= {"backend", "precision", "size_mb", "rss_mb", "load_s", "latency_ms", "throughput_ips",
                          "accuracy", "runtime", "deployed"}
        for bs in (1, 4):
            lat = v["latency_ms"][f"bs{bs}"]
            assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
            assert lat["runs"] >= 3
            assert 0 < v["cpu_ms"][f"bs{bs}"]["p50"] <= v["cpu_ms"][f"bs{bs}"]["p90"]
            assert v["throughput_ips"][f"bs{bs}"] == pytest.approx(bs / lat["p50"] * 1000, rel=0.01, abs=0.06)
        acc = v["accuracy"]
        assert acc["images"] == 200 and acc["top1"] <= acc["top5"]
        assert acc["top1"] * 2 == pytest.approx(round(acc["top1"] * 2), abs=1e-6)  # a count of the 200 images
    assert [v["name"] for v in data["variants"] if v["deployed"]] == ["onnxruntime/int8"]  # manifest's runtime
    skipped = {s["name"]: s["reason"] for s in data["skipped"]}
    # onnxruntime registers no bf16 runtime variant (deploykit.variants): the bench says so, and where bf16 runs
    assert "no bf16 variant is registered for onnxruntime (bf16 runs on openvino)" in skipped["onnxruntime/bf16"]


@pytest.mark.parametrize("name", ["torch/fp32", "openvino/fp32"])
def test_float_variants_agree_where_the_margin_allows(result, logits, name):
    ref, got = logits["onnxruntime/fp32"], logits[name]
    # The same float weights (BN folded for ONNX) computed in f32 everywhere (OpenVINO's precision hint is forced
    # to f32): only summation order and kernel blocking differ between runtimes and ISAs. Measured: 1e-7 of a
    # 0.25 logit scale (~4e-7 relative) on AVX2 and on AMX; 1e-4 relative leaves 250x, and a wrong fold or
    # kernel is off by >1e-2.
    err = float(np.abs(ref - got).max())
    assert err <= 1e-4 * float(np.abs(ref).max()), err
    # Where the top-2 gap exceeds 2x the max error no rounding can flip the prediction, so the bench's accuracies
    # may differ only by the share of the other inputs (measured: none of them: the smallest gap is 2e-5).
    decided = _top2_gap(ref) > 2 * err
    assert decided.mean() >= 0.9, decided.mean()
    acc = {v["name"]: v["accuracy"]["top1"] for v in result["variants"]}
    assert abs(acc[name] - acc["onnxruntime/fp32"]) <= 100 * (1 - decided.mean()) + 1e-9


def test_int8_variants_stay_within_quantization_noise(result, logits):
    # SQNR bounds, not agreement: INT8 logits of a random-weight net differ by ~half the typical top-2 gap, so
    # their argmax legitimately differs on a few % of inputs (measured 96% ORT vs OpenVINO on AVX2 and on AMX).
    # The same QDQ graph on ONNX Runtime and OpenVINO: requantization rounding and fusion differ, the model
    # does not. Measured 39.6 dB; 25 dB leaves room for non-VNNI u8s8 saturation, a wrong scale or a
    # dropped zero point gives < 10 dB.
    assert fidelity(logits["onnxruntime/int8"], logits["openvino/int8"])["sqnr_db"] > 25
    # INT8 (per-channel weights, per-tensor activations) against its own float model: measured 36.3 dB (ORT)
    # and 36.2 dB (OpenVINO); 20 dB is the quantization-noise floor a working PTQ stays above.
    for name in ("onnxruntime/int8", "openvino/int8"):
        assert fidelity(logits["onnxruntime/fp32"], logits[name])["sqnr_db"] > 20, name
    sizes = {v["name"]: v["size_mb"] for v in result["variants"]}
    assert sizes["onnxruntime/int8"] < 0.6 * sizes["onnxruntime/fp32"]  # INT8 weights: a quarter of the bytes


def test_markdown_and_pareto_png(result, tmp_path):
    paths = write_bench(result, tmp_path)
    md = paths["md"].read_text()
    assert md.count("\n| ") >= 1 + len(result["variants"])
    assert "bs1 p50 / p90 / p99 ms" in md and "onnxruntime/bf16" in md
    png = paths["png_bs1"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(png).shape[:2]
    assert (w, h) == (1170, 728)  # 9 x 5.6 inches at 130 dpi
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_pareto_front():
    pts = [(1.0, 90.0), (2.0, 89.0), (3.0, 92.0), (0.5, 80.0), (3.0, 91.0), (4.0, 92.0)]
    assert pareto_front(pts) == [3, 0, 2]
    assert pareto_front([]) == []


def test_missing_checkpoint_skips_torch_with_reason(artifact, tmp_path):
    moved = tmp_path / "copy.deploykit"
    shutil.copytree(artifact, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(tmp_path / "gone.pth")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    variants, skipped = discover_variants(moved, ["torch", "onnxruntime"])
    assert "torch/fp32" not in [v.name for v in variants]
    assert any(s["name"] == "torch/fp32" and "gone.pth" in s["reason"] and "not found" in s["reason"] for s in skipped)


def test_gpu_backends_skip_with_their_reason_here(artifact):
    table = bench_backends()
    gpu = [name for name, b in table.items() if b.device == "gpu"]
    assert {"tensorrt", "onnxruntime-cuda"} <= set(gpu)
    reasons = {name: table[name].unavailable() for name in gpu}
    if not any(reasons.values()):
        pytest.skip("every GPU backend can run here")
    variants, skipped = discover_variants(artifact, gpu)  # nothing is loaded: variants are made lazily
    assert {s["name"]: s["reason"] for s in skipped} == {f"{n}/int8": why for n, why in reasons.items() if why}
    assert {v.name for v in variants} == {f"{n}/int8" for n, why in reasons.items() if not why}


def test_bench_doctor_and_environment_read_the_backend_registry(artifact):
    """A backend registered anywhere is benchmarked, diagnosed and versioned with no list edited elsewhere."""
    from deploykit import doctor
    from deploykit.backends import BACKENDS, Backend
    from deploykit.environment import packages

    def check_dummy():
        return doctor.Check("dummy-runtime", True, "1.0", "registered by a test")

    class DummyBackend(Backend):
        name = "dummy"
        packages = ("dummy-runtime-dist",)
        reads = (".onnx",)
        bench_modes = {"dummy-gpu": {"device": "gpu"}}

        @classmethod
        def unavailable(cls, **settings):
            return f"the dummy runtime never runs (settings {settings})"

        @classmethod
        def doctor_checks(cls):
            return (check_dummy,)

        def run(self, x):
            raise AssertionError("never loaded")

    BACKENDS.names()  # load the real backends first
    BACKENDS.register("dummy")(DummyBackend)
    try:
        assert "dummy" in default_backends() and "dummy" in known_backends()
        assert "dummy-gpu" in known_backends() and "dummy-gpu" not in default_backends()  # modes are opt-in
        assert bench_backends()["dummy-gpu"].device == "gpu"
        assert parse_backends("dummy,dummy-gpu") == ["dummy", "dummy-gpu"]
        assert doctor.checks()[-3] is check_dummy and check_dummy in doctor.CHECKS  # after the real runtimes
        assert "dummy-runtime-dist" in packages()
        variants, skipped = discover_variants(artifact, ["onnxruntime", "dummy", "dummy-gpu"])
        assert {v.backend for v in variants} == {"onnxruntime"}
        reasons = {s["name"]: s["reason"] for s in skipped}
        assert reasons["dummy/fp32"] == "the dummy runtime never runs (settings {})"
        assert reasons["dummy-gpu/int8"] == "the dummy runtime never runs (settings {'device': 'gpu'})"
    finally:
        BACKENDS._items.pop("dummy", None)
    assert "dummy" not in known_backends() and check_dummy not in doctor.checks()


def test_bad_arguments_are_user_errors():
    with pytest.raises(BenchError, match=r"unknown backend tensorflow\. Fix: choose from "
                                         + re.escape(", ".join(known_backends()))):
        parse_backends("torch,tensorflow")
    with pytest.raises(BenchError, match=r"--batch '1,x' is not a comma-separated list of integers\. Fix: "):
        parse_batches("1,x")
    with pytest.raises(BenchError, match=r"needs positive batch sizes"):
        parse_batches("0")


def _cli(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_bench_writes_outputs(artifact, tmp_path):
    out = tmp_path / "b"
    p = _cli("bench", artifact, "--backends", "onnxruntime", "--batch", "1,2", "--runs", "3", "--warmup", "1",
             "--eval-images", "50", "--budget", "1", "--out", out)
    assert p.returncode == 0, p.stderr
    data = json.loads((out / "bench.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["onnxruntime/fp32", "onnxruntime/int8"]
    assert (out / "pareto_bs1.png").stat().st_size > 10_000 and (out / "pareto_bs2.png").is_file()
    assert "| onnxruntime/int8 (deployed) |" in p.stdout


def test_cli_gate_exit_codes(artifact, tmp_path):
    base = tmp_path / "baseline.json"
    p = _cli("bench", artifact, "--baseline", base, "--update-baseline", "--batch", "1", "--gate-seconds", "0.5")
    assert p.returncode == 0, p.stderr
    data = json.loads(base.read_text())
    assert data["schema"] == BASELINE_SCHEMA and len(data["entries"]) == 1
    entry = data["entries"][0]
    assert entry["key"].endswith("/bs1") and entry["rounds"] >= 30 and len(entry["ratios"]) == entry["rounds"]
    ref = entry["reference"]
    assert ref["kind"] == "model" and (tmp_path / ref["path"]).is_file() and ref["path"].startswith("baseline.reference/")
    assert 0.8 < entry["median_ratio"] < 1.25  # the deployed model timed against its own copy
    # auto resolves to a concrete clock once (wall for this sub-ms model unless the machine is swamped)
    assert data["settings"]["clock"] == "auto" and entry["clock"] in ("wall", "cpu")

    # a baseline whose ratios are 3x smaller = the candidate is 200% slower than "before": a regression
    fast = {**data, "entries": [{**entry, "ratios": [r / 3 for r in entry["ratios"]]}]}
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    p = _cli("bench", artifact, "--baseline", tmp_path / "fast.json", "--max-slowdown", "10%", "--gate-seconds", "0.5",
             "--out", tmp_path / "g")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "REGRESSION: slowdown +" in p.stdout and "gate: regression (exit 1)" in p.stdout
    gate = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert gate["exit_code"] == 1 and gate["decisions"][0]["slowdown"] > 1.0

    # a baseline 3x slower than now: the candidate got faster, no regression
    slow = {**data, "entries": [{**entry, "ratios": [r * 3 for r in entry["ratios"]]}]}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    p = _cli("bench", artifact, "--baseline", tmp_path / "slow.json", "--gate-seconds", "0.5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no regression: slowdown -" in p.stdout


def test_cli_gate_bad_baseline_is_exit_2(artifact, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = _cli("bench", artifact, "--baseline", bad)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: baseline {bad} is not valid JSON") and "Fix: re-create it with --update-baseline" in p.stderr
    p = _cli("bench", artifact, "--baseline", tmp_path / "none.json", "--max-slowdown", "abc")
    assert p.returncode == 2 and "is not a number or percentage" in p.stderr
    p = _cli("bench", artifact, "--baseline", tmp_path / "none.json")
    assert p.returncode == 2 and "Fix: create it with --baseline FILE --update-baseline" in p.stderr


def test_planted_slowdown_spins_for_the_given_fraction():
    import time

    def work():
        t = time.process_time() + 0.002
        while time.process_time() < t:
            pass

    slowed = with_planted_slowdown(work, 0.5)
    t0 = time.process_time()
    for _ in range(20):
        slowed()
    spent = time.process_time() - t0
    assert 0.058 <= spent < 0.09  # 20 x (2 ms + 1 ms) of CPU time; a preempted call costs no CPU time
    assert with_planted_slowdown(work, 0.0) is work


def test_gate_refuses_a_changed_reference_model(artifact, tmp_path):
    data = make_baseline(artifact, tmp_path / "b.json", [1], seconds=0.2)
    assert json.loads((tmp_path / "b.json").read_text())["entries"][0]["rounds"] == data["entries"][0]["rounds"]
    model = tmp_path / data["entries"][0]["reference"]["path"]
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(GateError, match=r"reference model .* changed since the baseline was made\. Fix: re-create"):
        load_baseline(tmp_path / "b.json")
