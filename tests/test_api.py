"""End to end through the one entry point (deploykit.compress) and the real `deploykit` command."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import save_tiny_checkpoint

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from deploykit import compress  # noqa: E402
from deploykit.artifact import Artifact, sha256_file  # noqa: E402
from deploykit.checkpoint import save_timm_checkpoint  # noqa: E402
from deploykit.errors import ArtifactError, CheckpointError, DataError, ParityError  # noqa: E402

REFERENCE = Path(__file__).parents[1] / "models" / "resnet10t_fmnist.pth"
FAST_EVAL = {"eval__latency_runs": 5, "eval__warmup_runs": 1, "eval__latency_budget_s": 2.0}
FAST_SELECT = {"stages__select_runtime__rounds": 2, "stages__select_runtime__time_torch": False,
               "stages__select_runtime__time_budget_s": 5.0}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A small timm ResNet with random weights, saved in timm train.py format."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module")
def reference_artifact(tmp_path_factory):
    """The README's main job on the real reference checkpoint, evaluated on 2000 real test images."""
    out = tmp_path_factory.mktemp("ref") / "ref.deploykit"
    return compress(REFERENCE, "int8-ptq", out=out, data__name="fashion-mnist", data__eval_images=2000,
                    **FAST_EVAL, **FAST_SELECT)


def test_reference_int8_keeps_accuracy(reference_artifact):
    rep = reference_artifact.report
    orig, comp = rep["models"]["original"], rep["models"]["compressed"]
    assert orig["top1"] > 88.0                        # a real model, not a coin toss
    assert abs(orig["top1"] - comp["top1"]) <= 1.0    # 2000 images: +-1 point (full 10k run: see README)
    assert abs(orig["macro_f1"] - comp["macro_f1"]) <= 1.5
    assert rep["fidelity"]["top1_agreement"] >= 98.0
    assert len(comp["per_class_f1"]) == 10 and len(rep["per_class"]) == 10
    # the runtime is chosen by measurement; every INT8 candidate must still be accurate
    select = rep["stage_facts"]["select_runtime"]
    assert select["chosen"] in {row["name"] for row in select["candidates"]}
    int8 = [row for row in select["candidates"] if row["precision"] == "int8"]
    assert len(int8) >= 2
    for row in int8:  # those evaluated (the others: a faster candidate met the budget first)
        if row["evaluated"]:
            assert abs(row["top1"] - orig["top1"]) <= 1.0 and row["top1_agreement"] >= 98.0, row["name"]
    fp32_mb = (reference_artifact.path / "model.fp32.onnx").stat().st_size
    assert (reference_artifact.path / "model.int8.onnx").stat().st_size < 0.4 * fp32_mb  # int8 weights
    assert rep["data"] == {"name": "fashion-mnist", "real": True, "calibration_images": 300, "eval_images": 2000}


def test_one_record_per_number_selection_and_final_tables_agree(reference_artifact):
    """The final table shows select_runtime's own records: same latency, same runs, same accuracy, not a re-run."""
    rep = reference_artifact.report
    select = rep["stage_facts"]["select_runtime"]
    rows = {r["name"]: r for r in select["candidates"]}
    shipped, ref = rows[select["chosen"]], rows["onnxruntime-fp32"]
    pairs = [("compressed", shipped), ("onnx_fp32", ref)]
    if "onnx_fp32" not in rep["models"]:  # a float variant won the timing on a busy machine: no separate FP32 row
        assert shipped["precision"] == "fp32"
        pairs = pairs[:1]
    for key, row in pairs:
        model = rep["models"][key]
        for bs in ("bs1", "bs32"):
            assert model["timing"][bs] == row["timing"][bs], (key, bs)
            assert model["latency_ms"][f"{bs}_p50"] == row["latency_ms"][bs]
        assert model["top1"] == row["top1"]
    # the same numbers in report.md: the runtime table's cell and the latency detail line
    md = (reference_artifact.path / "report.md").read_text()
    t = shipped["timing"]["bs1"]
    cell = f"{t['p50']:.2f} [{t['p50_interval'][0]:.2f}, {t['p50_interval'][1]:.2f}] n={t['runs']}"
    assert md.count(cell) >= 2, cell


def test_report_and_manifest_shape(reference_artifact):
    path = reference_artifact.path
    rep = json.loads((path / "report.json").read_text())
    assert rep["schema"] == 1
    assert {"original", "compressed"} <= set(rep["models"]) <= {"original", "onnx_fp32", "compressed"}
    for m in rep["models"].values():
        assert {"backend", "precision", "top1", "top5", "macro_f1", "per_class_f1", "latency_ms", "size_mb"} <= set(m)
        assert {"bs1_p50", "bs32_p50"} <= set(m["latency_ms"])
    assert [s["name"] for s in rep["stages"]][:3] == ["fuse_bn", "export_onnx", "quantize_onnx"]
    assert "top-1 agreement" in (path / "report.md").read_text()
    man = json.loads((path / "manifest.json").read_text())
    assert man["source"]["sha256"] == sha256_file(REFERENCE)
    assert man["runtime"]["variant"] == rep["stage_facts"]["select_runtime"]["chosen"]
    assert man["runtime"]["model"] in man["files"]
    assert {"model.onnx", "model.fp32.onnx", "model.int8.onnx", "preprocessing.json", "recipe.yaml",
            "report.json"} <= set(man["files"])
    assert {"torch", "onnx", "onnxruntime", "deploykit"} <= set(man["versions"])
    art = Artifact.open(path)
    assert art.verify() == []
    # the TTA policy was chosen on one half of the evaluation images and reported on the other, and is stored
    tp = rep["stage_facts"]["tta_policy"]
    assert tp["chosen_on"] + tp["held_out"]["images"] == 2000
    assert art.tta_policy is not None and art.tta_policy.to_dict() == {**tp["policy"]}
    assert "tta_policy.json" in man["files"] and "tta_policy.json" in art.served_files()
    held = tp["held_out"]
    assert held["none"]["mean_views"] == 1.0 and held["all"]["mean_views"] == 4.0
    assert 1.0 <= held["policy"]["mean_views"] <= 4.0
    if art.tta_policy.mode == "none":  # then it says what gain justified serving no extra views
        assert art.tta_policy.reason.startswith("TTA does not help this model")
    assert art.preprocessing.class_names[0] == "T-shirt/top"
    assert yaml.safe_load((path / "recipe.yaml").read_text())["data"]["name"] == "fashion-mnist"


def test_artifact_backend_reproduces_reported_accuracy(reference_artifact):
    from deploykit.data.fashion_mnist import load_fashion_mnist

    art = Artifact.open(reference_artifact.path)
    test = load_fashion_mnist("test").head(2000, seed=0)
    logits = art.backend().run(art.preprocessing.from_uint8(test.images))
    top1 = float((logits.argmax(1) == test.labels).mean() * 100)
    assert top1 == pytest.approx(reference_artifact.report["models"]["compressed"]["top1"], abs=1e-6)


def test_int8_weight_range_follows_the_cpu_and_is_warned_on_another(reference_artifact, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from deploykit import environment

    art = Artifact.open(reference_artifact.path)
    facts = reference_artifact.report["stage_facts"]["quantize_onnx"]
    # reduce_range auto: 8-bit weights where the CPU's INT8 dot product accumulates in int32 (VNNI/AMX), 7-bit where
    # ONNX Runtime's VPMADDUBSW would saturate int16; the manifest records what was used
    seven_bit = not environment.has_int8_vnni()
    assert facts["reduce_range"] is seven_bit and art.manifest["quantization"]["reduce_range"] is seven_bit
    # the stored weights are exactly that: symmetric per-channel, each channel's largest weight maps to 63 or 127
    graph = onnx.load(str(art.path / "model.int8.onnx")).graph
    q = [np.abs(numpy_helper.to_array(t).astype(np.int32)) for t in graph.initializer
         if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert q and max(int(w.max()) for w in q) == (64 if seven_bit else 127)
    # serving full-range weights on a CPU without VNNI warns, in one line naming the fix
    monkeypatch.setattr(environment, "has_int8_vnni", lambda: False)
    art.manifest["quantization"]["reduce_range"] = False
    art.runtime.setdefault("files", {})["onnxruntime"] = "model.int8.onnx"  # whichever variant won the timing
    with pytest.warns(RuntimeWarning, match=r"model.int8.onnx use the full 8-bit range.*re-run `deploykit compress` "
                                            r"on this machine type"):
        art.backend("onnxruntime", precision="int8")
    art.manifest["quantization"]["reduce_range"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        art.backend("onnxruntime", precision="int8")


def test_data_free_path_is_honest(tiny_ckpt, tmp_path):
    res = compress(tiny_ckpt, "int8-ptq", out=tmp_path / "df", data__synthetic_images=8, data__synthetic_steps=3,
                   data__check_images=16, **FAST_EVAL, **FAST_SELECT)
    rep = res.report
    assert rep["data"]["real"] is False and rep["data"]["calibration_images"] == 8
    assert rep["models"]["compressed"]["top1"] is None
    assert rep["fidelity"]["inputs_kind"] == "held-out synthetic inputs"
    assert rep["fidelity"]["inputs"] == 16                    # the check images, not the 8 calibration images
    assert any("Accuracy was NOT measured" in n for n in rep["notes"])
    # synthesis is a step of its own, timed before the stages: 8 calibration + 16 held-out inputs, 3 steps each
    assert rep["stages"][0]["name"] == "synthesize_inputs" and rep["stages"][0]["seconds"] > 0
    facts = rep["stage_facts"]["synthesize_inputs"]
    assert (facts["kind"], facts["images"], facts["held_out"], facts["steps"]) == ("synthetic", 24, 16, 3)


def test_failed_run_leaves_nothing_and_keeps_old_artifact(tiny_ckpt, tmp_path):
    out = tmp_path / "a.deploykit"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ArtifactError, match="already exists.*--overwrite"):
        compress(tiny_ckpt, "fp32", out=out)
    # an impossible parity tolerance makes export fail half-way through the run
    with pytest.raises(ParityError, match="exported ONNX disagrees"):
        compress(tiny_ckpt, "fp32", out=out, overwrite=True, data__synthetic_images=4, data__synthetic_steps=0,
                 data__check_images=8, stages__export_onnx__atol=1e-30, stages__export_onnx__min_top1_agreement=100)
    assert [p.name for p in tmp_path.iterdir()] == ["a.deploykit"]          # no temp dirs left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"]                   # old artifact untouched


def test_overwrite_replaces_only_when_complete(tiny_ckpt, tmp_path):
    out = tmp_path / "b.deploykit"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res = compress(tiny_ckpt, "fp32", out=out, overwrite=True, eval__enabled=False, data__synthetic_images=4,
                   data__synthetic_steps=0, data__check_images=8)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert res.manifest["runtime"]["precision"] == "fp32"


@pytest.mark.parametrize("name, backend", [("bf16", "openvino"), ("fp16", "onnxruntime")])
def test_bf16_and_fp16_recipes_pass_parity(tiny_ckpt, tmp_path, name, backend):
    from deploykit.errors import RuntimeUnavailable

    try:
        res = compress(tiny_ckpt, name, out=tmp_path / name, eval__enabled=False, data__synthetic_images=4,
                       data__synthetic_steps=0, data__check_images=16)
    except RuntimeUnavailable as err:  # the stated refusal, e.g. under ONEDNN_MAX_CPU_ISA=AVX2 on an AMX CPU
        assert name == "bf16" and "OpenVINO cannot run BF16 on this CPU" in str(err)
        pytest.skip(str(err))
    facts = res.report["stage_facts"]["cast"]
    # the contract: every logit within the stated tolerance of FP32 (agreement of a random net flips on near-ties)
    assert facts["runtime"]["backend"] == backend
    assert facts["parity"]["max_abs_logit_diff"] <= facts["parity"]["tolerance"]
    assert Artifact.open(res.path).backend().run(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


def test_class_count_mismatch_is_caught_before_work(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=5, in_chans=1, channels=(8, 16, 32, 64))
    ckpt = tmp_path / "five.pth"
    save_timm_checkpoint(ckpt, arch="resnet10t", state_dict=m.state_dict(),
                         args={"model": "resnet10t", "num_classes": 5, "in_chans": 1,
                               "model_kwargs": {"channels": (8, 16, 32, 64)}})
    with pytest.raises(DataError, match="has 10 classes but the model predicts 5"):
        compress(ckpt, "int8-ptq", out=tmp_path / "x", data__name="fashion-mnist")
    assert not (tmp_path / "x").exists()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deploykit", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_end_to_end(tiny_ckpt, tmp_path):
    out = _cli("compress", tiny_ckpt, "--int8", "--data", "fashion-mnist", "--eval-images", "300",
               "--calibration-images", "64", "--calibration-method", "entropy", "--no-eval", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    art = Artifact.open(tmp_path / "tiny.deploykit")          # default output: <ckpt-stem>.deploykit in cwd
    rec = yaml.safe_load((art.path / "recipe.yaml").read_text())
    assert rec["stages"][2]["quantize_onnx"]["method"] == "entropy" and rec["data"]["calibration_images"] == 64


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("hello"), "not a PyTorch checkpoint"),
])
def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, make, match):
    bad = tmp_path / "bad.pth"
    make(bad)
    out = _cli("compress", bad, "--int8", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0] and "Fix:" in lines[0]
    assert list(tmp_path.iterdir()) == [bad]


def test_untrusted_pickle_is_refused_by_the_api(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(8, 16, 32, 64)), path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        compress(path, "fp32", out=tmp_path / "x")


@pytest.mark.parametrize("after_s", [0.0, 1.0, 2.0])
def test_sigterm_mid_run_leaves_no_partial_output(tiny_ckpt, tmp_path, after_s):
    """SIGTERM at several moments once the artifact is being written (stages, selection, evaluation): exit 143
    and nothing left, never a crash; a run that finished first exits 0 with its complete artifact."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "deploykit", "compress", str(tiny_ckpt), "--int8",
                             "--data", "fashion-mnist", "--out", str(tmp_path / "t.deploykit")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".t.deploykit.tmp-*")) and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    if rc == 0:
        assert [p.name for p in tmp_path.iterdir()] == ["t.deploykit"]
        assert Artifact.open(tmp_path / "t.deploykit").verify() == []
    else:
        assert rc == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
        assert list(tmp_path.iterdir()) == []


def test_a_second_run_to_the_same_out_stops_at_once(tiny_ckpt, tmp_path):
    from deploykit.artifact import ArtifactWriter

    out = tmp_path / "same.deploykit"
    with ArtifactWriter(out) as work:  # a first run, still writing
        (work / "model.onnx").write_bytes(b"first")
        r = subprocess.run([sys.executable, "-m", "deploykit", "compress", str(tiny_ckpt), "--fp32", "--data", "none",
                            "--no-eval", "--out", str(out)], capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith(f"error: another deploykit run is writing {out} right now. Fix: wait for it")
    assert (out / "model.onnx").read_bytes() == b"first"  # the first run committed, untouched
    with ArtifactWriter(tmp_path / "other.deploykit"):  # the lock is per output path, and released
        with ArtifactWriter(out, overwrite=True):
            pass


def test_an_unwritable_or_full_disk_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import errno

    import deploykit.api as api_mod

    r = subprocess.run([sys.executable, "-m", "deploykit", "compress", str(tiny_ckpt), "--fp32", "--data", "none",
                        "--no-eval", "--out", "/sys/x.deploykit"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # sysfs refuses even root
    assert re.match(r"error: cannot write the artifact /sys/x\.deploykit: (Operation not permitted|Read-only file "
                    r"system|Permission denied)\. Fix: ", r.stderr.strip().splitlines()[-1]), r.stderr

    def full(*_a, **_k):  # the disk fills up while the run writes its report
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api_mod, "write_json", full)
    with pytest.raises(ArtifactError, match="cannot write the artifact .*: No space left on device"):
        compress(tiny_ckpt, "fp32", out=tmp_path / "full.deploykit", eval__enabled=False, data__synthetic_images=4,
                 data__synthetic_steps=0, data__check_images=8)
    assert list(tmp_path.iterdir()) == []


def test_stale_tempdir_of_a_killed_run_is_cleaned(tiny_ckpt, tmp_path):
    stale = tmp_path / ".s.deploykit.tmp-999999999-abc"   # no such pid
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    compress(tiny_ckpt, "fp32", out=tmp_path / "s.deploykit", eval__enabled=False, data__synthetic_images=4,
             data__synthetic_steps=0, data__check_images=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.deploykit"]


def test_a_stop_request_blocks_the_commit_even_if_its_exception_was_swallowed(tmp_path, monkeypatch):
    # a SIGTERM handler that fires inside __del__ loses its exception; the flag it sets must still stop the commit
    import deploykit.stop as stop_mod
    from deploykit.artifact import ArtifactWriter
    from deploykit.stop import request_stop
    from deploykit.errors import Terminated

    monkeypatch.setattr(stop_mod, "_stop_code", None)
    out = tmp_path / "a.deploykit"
    with pytest.raises(Terminated) as stop:
        with ArtifactWriter(out) as work:
            (work / "model.onnx").write_bytes(b"complete")
            request_stop(143)
    assert stop.value.code == 143
    assert list(tmp_path.iterdir()) == []
