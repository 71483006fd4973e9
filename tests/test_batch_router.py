"""One runtime per batch size: the routing rule, and a real artifact that ships two runtimes read back and served."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from deploykit.backends.batch_router import BatchRouter, nearest_batch
from deploykit.errors import ArtifactError

pytest.importorskip("openvino")


def test_a_batch_goes_to_the_nearest_timed_size_on_a_log_scale():
    assert [nearest_batch([1, 32], n) for n in (1, 5, 6, 32, 500)] == [1, 1, 32, 32, 32]
    # 3 is log2 1.58: 1.42 from 8, 1.58 from 1; 22 and 23 straddle sqrt(8 * 64) = 22.6
    assert [nearest_batch([1, 8, 64], n) for n in (2, 3, 22, 23)] == [1, 8, 8, 64]
    assert nearest_batch([1, 4], 2) == 4  # equidistant: the larger size's runtime


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A real compress of a tiny checkpoint whose select_runtime routes batch 1 to ONNX Runtime and batch 32 to
    OpenVINO (forced: which runtime is faster where depends on the machine)."""
    from deploykit import compress
    from helpers import save_tiny_checkpoint

    d = tmp_path_factory.mktemp("routed")
    save_tiny_checkpoint(d / "tiny.pth")
    art = compress(d / "tiny.pth", "int8-ptq", out=d / "tiny.deploykit", data__name="fashion-mnist",
                   data__eval_images=100, stages__select_runtime__rounds=2, stages__select_runtime__time_torch=False,
                   stages__select_runtime__force_by_batch={1: "onnxruntime-int8", 32: "openvino-fp32"})
    return art


def test_the_artifact_routes_each_batch_to_its_runtime(routed, monkeypatch):
    from deploykit.artifact import Artifact
    from deploykit.backends import create_backend

    monkeypatch.delenv("DEPLOYKIT_BACKEND", raising=False)
    art = Artifact.open(routed.path)
    rt = json.loads((art.path / "manifest.json").read_text())["runtime"]
    assert {bs: r["variant"] for bs, r in rt["by_batch"].items()} == {"1": "onnxruntime-int8", "32": "openvino-fp32"}
    assert rt["backend"] == "openvino" and rt["by_batch"]["32"]["model"] == "model.fp32.onnx"  # the largest size's
    router = art.backend(threads=1)
    assert isinstance(router, BatchRouter) and router.info()["routes"]["bs1"]["backend"] == "onnxruntime"
    assert router.info()["routes"]["bs1"]["spinning"] is False  # it shares the process with OpenVINO
    x = np.random.default_rng(0).standard_normal((8, *art.preprocessing.input_size)).astype(np.float32)
    ort = create_backend("onnxruntime", art.path / rt["by_batch"]["1"]["model"], threads=1)
    ov = create_backend("openvino", art.path / rt["by_batch"]["32"]["model"], threads=1)
    # each runtime is deterministic for one input and thread count: bitwise equal to a fresh session of its own,
    # while the INT8 and FP32 models differ, so the bits name the runtime that ran
    assert np.array_equal(router.run(x[:1]), ort.run(x[:1]))
    assert np.array_equal(router.run(x), ov.run(x))
    assert not np.array_equal(ort.run(x), ov.run(x))
    # naming a runtime (DEPLOYKIT_BACKEND) serves that one alone
    monkeypatch.setenv("DEPLOYKIT_BACKEND", "onnxruntime")
    assert art.backend(threads=1).name == "onnxruntime"


def test_serving_checks_every_routed_model(routed, tmp_path, monkeypatch):
    from deploykit.artifact import Artifact

    monkeypatch.delenv("DEPLOYKIT_BACKEND", raising=False)
    copy = shutil.copytree(routed.path, tmp_path / "copy.deploykit")
    art = Artifact.open(copy)
    assert {"model.fp32.onnx", "model.int8.onnx"} <= set(art.served_files())
    with open(copy / art.runtime["by_batch"]["1"]["model"], "ab") as f:  # the batch-1 model, not the main one
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="model.int8.onnx no longer matches"):
        art.check_served()


def test_the_report_times_each_batch_size_on_its_route(routed):
    """The report's compressed model is the router: its batch-1 latency is select_runtime's record of the batch-1
    route, its batch-32 latency that of the batch-32 route (the same records, so the same numbers)."""
    rep = routed.report
    cands = {c["name"]: c for c in rep["stage_facts"]["select_runtime"]["candidates"]}
    got = rep["models"]["compressed"]
    assert got["backend"] == "by-batch"
    assert got["latency_ms"]["bs1_p50"] == cands["onnxruntime-int8"]["latency_ms"]["bs1"]
    assert got["latency_ms"]["bs32_p50"] == cands["openvino-fp32"]["latency_ms"]["bs32"]
    assert got["top1"] == cands["openvino-fp32"]["top1"]  # evaluation batches (64) go to the batch-32 route


def test_bench_times_the_router_as_the_deployed_model(routed):
    from deploykit.benchmark import discover_variants

    variants, _ = discover_variants(routed.path, ["onnxruntime"], threads=1)
    deployed = [v for v in variants if v.deployed]
    assert [v.name for v in deployed] == ["by-batch"]
    assert deployed[0].notes == ["routes: bs1 onnxruntime-int8, bs32 openvino-fp32"]
    assert isinstance(deployed[0].make(), BatchRouter)
