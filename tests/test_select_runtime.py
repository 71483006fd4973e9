"""select_runtime: the choice on recorded timings (pure), block timing on real sleeps, and one real end-to-end run."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from deploykit.errors import DeployKitError, RecipeError
from deploykit.stages.select_runtime import budget_notes, choose_runtime


def row(name, counterpart, bs1, bs32, ok=True):
    return {"name": name, "counterpart": counterpart, "meets_budget": ok, "latency_ms": {"bs1": bs1, "bs32": bs32}}


# Recorded on the AVX-512 VNNI machine, timm resnet50 224, 2 threads (issue 8's table).
RESNET50 = [
    row("onnxruntime-fp32", None, 29.5, 876),
    row("openvino-fp32", "onnxruntime-fp32", 29.9, 883),
    row("openvino-bf16", "openvino-fp32", 49.5, 1551),
    row("onnxruntime-int8", "onnxruntime-fp32", 10.4, 276),
    row("openvino-int8", "openvino-fp32", 8.4, 222),
]


def test_picks_the_fastest_variant_within_budget():
    d = choose_runtime(RESNET50)
    assert d["chosen"] == "openvino-int8"
    assert d["scores"]["openvino-int8"] == pytest.approx(np.sqrt(8.4 / 29.5 * 222 / 876), rel=1e-3)
    assert "3.51x onnxruntime-fp32" in d["reason"] and "3.95x" in d["reason"]
    # the same table with OpenVINO INT8 outside the accuracy budget: the next fastest ships
    rows = copy.deepcopy(RESNET50)
    rows[-1]["meets_budget"] = False
    d = choose_runtime(rows)
    assert d["chosen"] == "onnxruntime-int8"
    assert d["verdicts"]["openvino-int8"] == "outside the accuracy budget"


def test_ratios_paired_by_round_decide_over_the_medians():
    """Medians of runs taken while a shared machine changed speed can order two variants wrongly; the ratio to
    the reference paired by round (``vs_reference``) is what the choice compares, and the reason quotes it."""
    rows = [row("onnxruntime-fp32", None, 10.0, 100.0), row("openvino-int8", "onnxruntime-fp32", 4.0, 40.0),
            row("openvino-bf16", "onnxruntime-fp32", 5.0, 50.0)]
    assert choose_runtime(rows)["chosen"] == "openvino-int8"   # by the medians alone
    rows[0]["vs_reference"] = {"bs1": 1.0, "bs32": 1.0}
    rows[1]["vs_reference"] = {"bs1": 0.5, "bs32": 0.5}          # its medians mixed in fast-machine runs
    rows[2]["vs_reference"] = {"bs1": 0.4, "bs32": 0.25}
    d = choose_runtime(rows)
    assert d["chosen"] == "openvino-bf16" and d["scores"]["openvino-bf16"] == round(np.sqrt(0.4 * 0.25), 4)
    assert "bs1 5.00 ms (2.50x onnxruntime-fp32), bs32 50.00 ms (4.00x onnxruntime-fp32)" in d["reason"]
    # a counterpart comparison is paired too: faster by the medians, slower in the same rounds -> did not pay
    rows[1]["vs_reference"] = {"bs1": 1.1, "bs32": 0.5}
    assert choose_runtime(rows, objective="latency")["verdicts"]["openvino-int8"].startswith(
        "slower than its FP32 counterpart onnxruntime-fp32 at bs1 (4.00 vs 10.00 ms, 1.10x its time)")


def test_never_picks_a_variant_slower_than_its_fp32_counterpart():
    # bf16 without AMX: slower than f32 at both sizes -> reported as not paying, never chosen
    d = choose_runtime(RESNET50)
    assert d["verdicts"]["openvino-bf16"].startswith("slower than its FP32 counterpart openvino-fp32 at bs1 "
                                                     "(49.50 vs 29.90 ms, 1.66x its time), bs32 (1551.00 vs 883.00 ms, 1.76x its time)")
    # quantize_static defaults: equal at bs1, slower at bs32 -> excluded even though nothing else is faster
    rows = [row("onnxruntime-fp32", None, 29.5, 876), row("onnxruntime-int8", "onnxruntime-fp32", 29.5, 1072)]
    assert choose_runtime(rows)["chosen"] == "onnxruntime-fp32"
    # faster on the geometric mean (and at bs32), but slower at bs1: still never chosen
    rows = [row("onnxruntime-fp32", None, 0.65, 64.0), row("onnxruntime-int8", "onnxruntime-fp32", 0.75, 39.4)]
    d = choose_runtime(rows)
    assert d["scores"]["onnxruntime-int8"] < d["scores"]["onnxruntime-fp32"]
    assert d["chosen"] == "onnxruntime-fp32"
    assert "did not pay" in d["verdicts"]["onnxruntime-int8"]


def test_objective_decides_between_latency_and_throughput_winners():
    rows = [row("onnxruntime-fp32", None, 10.0, 300), row("openvino-fp32", "onnxruntime-fp32", 9.0, 290),
            row("onnxruntime-int8", "onnxruntime-fp32", 4.0, 200), row("openvino-int8", "openvino-fp32", 5.0, 100)]
    assert choose_runtime(rows, objective="latency")["chosen"] == "onnxruntime-int8"
    assert choose_runtime(rows, objective="throughput")["chosen"] == "openvino-int8"
    assert choose_runtime(rows, objective="balanced")["chosen"] == "openvino-int8"  # sqrt(.5*.33) < sqrt(.4*.67)


def test_objective_also_decides_which_batch_sizes_must_pay():
    # the FP32 rows as measured on the pruned 64x64 LT Lite0 (select_runtime, 2 threads; the INT8 row is made up):
    # OpenVINO loses at bs1 and wins at bs32
    rows = [row("onnxruntime-fp32", None, 0.89, 18.40), row("openvino-fp32", "onnxruntime-fp32", 1.48, 11.08),
            row("openvino-int8", "openvino-fp32", 1.50, 8.00)]
    balanced = choose_runtime(rows)
    assert balanced["chosen"] == "onnxruntime-fp32"
    assert balanced["verdicts"]["openvino-fp32"].startswith("slower than its FP32 counterpart onnxruntime-fp32 at bs1")
    throughput = choose_runtime(rows, objective="throughput")
    assert throughput["chosen"] == "openvino-int8"
    assert set(throughput["verdicts"].values()) == {"eligible"}
    assert choose_runtime(rows, objective="latency")["chosen"] == "onnxruntime-fp32"


# Recorded on the AMX Xeon (2 threads): the 64x64 ResNet-10-T pruned to 0.42x, ms at bs1 / bs32, side by side.
# ONNX Runtime's per-call cost is the lower one, OpenVINO's INT8 kernels the faster ones on a batch.
PRUNED_RESNET = [
    row("onnxruntime-fp32", None, 0.62, 19.6),
    row("onnxruntime-int8", "onnxruntime-fp32", 0.41, 7.73),
    row("openvino-fp32", "onnxruntime-fp32", 0.74, 12.5),
    row("openvino-int8", "openvino-fp32", 0.81, 6.42),
    row("openvino-qdq", "openvino-fp32", 0.94, 6.58),
]


def test_per_batch_routes_each_size_to_its_fastest_variant():
    d = choose_runtime(PRUNED_RESNET, objective="per_batch")
    assert d["by_batch"] == {"bs1": "onnxruntime-int8", "bs32": "openvino-int8"}
    assert d["chosen"] == "openvino-int8"  # the largest size's: what a single-runtime consumer gets
    assert d["reason"] == ("the fastest eligible variant at each batch size: bs1 onnxruntime-int8 0.41 ms (1.51x "
                           "onnxruntime-fp32), bs32 openvino-int8 6.42 ms (3.05x onnxruntime-fp32)")
    # OpenVINO INT8 loses to OpenVINO FP32 at bs1: it may serve only the size where it pays
    assert d["verdicts"]["openvino-int8"].startswith("eligible at bs32 only (slower than its FP32 counterpart "
                                                     "openvino-fp32 at bs1 (0.81 vs 0.74 ms, 1.09x its time))")
    # a single-runtime objective gives up one size: balanced ships ONNX Runtime INT8 (1.20x OpenVINO's bs32 time),
    # and rules OpenVINO INT8 out altogether
    balanced = choose_runtime(PRUNED_RESNET)
    assert balanced["chosen"] == "onnxruntime-int8" and "by_batch" not in balanced
    assert balanced["verdicts"]["openvino-int8"].endswith("did not pay")


def test_per_batch_keeps_one_runtime_unless_a_second_earns_its_place():
    rows = copy.deepcopy(PRUNED_RESNET)
    rows[1]["latency_ms"]["bs1"] = 0.82 * 0.97  # 3% faster than the bs32 winner at bs1 ...
    rows[3]["latency_ms"]["bs1"] = 0.82         # ... which now pays at bs1 as well
    rows[0]["latency_ms"]["bs1"] = rows[2]["latency_ms"]["bs1"] = 0.90
    d = choose_runtime(rows, objective="per_batch")
    assert "by_batch" not in d and d["chosen"] == "openvino-int8"
    assert d["reason"].startswith("fastest eligible at every batch size (within 5%): bs1 openvino-int8 0.82 ms")
    # ... but with a tie of 1% the second runtime is worth it
    assert choose_runtime(rows, objective="per_batch", tie=0.01)["by_batch"]["bs1"] == "onnxruntime-int8"
    # a variant outside the accuracy budget serves no size, however fast
    rows = copy.deepcopy(PRUNED_RESNET)
    rows[1]["meets_budget"] = False
    d = choose_runtime(rows, objective="per_batch")
    assert d["by_batch"] == {"bs1": "onnxruntime-fp32", "bs32": "openvino-int8"}
    # no variant is usable at batch 1 (the floats miss the budget, OV INT8 loses to its counterpart there): the
    # largest size's winner serves every size
    rows = [row("onnxruntime-fp32", None, 0.5, 19.6, ok=False),
            row("openvino-fp32", "onnxruntime-fp32", 0.74, 12.5, ok=False),
            row("openvino-int8", "openvino-fp32", 0.81, 6.42)]
    d = choose_runtime(rows, objective="per_batch")
    assert d["chosen"] == "openvino-int8" and "by_batch" not in d


def test_forced_routes_are_shipped_and_flagged_when_outside_the_rules():
    d = choose_runtime(PRUNED_RESNET, force_by_batch={32: "openvino-qdq", 1: "openvino-int8"})
    assert d["by_batch"] == {"bs1": "openvino-int8", "bs32": "openvino-qdq"} and d["chosen"] == "openvino-qdq"
    assert "WARNING: openvino-int8 is slower than its FP32 counterpart" in d["reason"]
    with pytest.raises(RecipeError, match="tensorrt-int8"):
        choose_runtime(PRUNED_RESNET, force_by_batch={1: "tensorrt-int8"})


def test_honours_an_override_and_says_when_it_is_outside_the_rules():
    d = choose_runtime(RESNET50, force="onnxruntime-fp32")
    assert d["chosen"] == "onnxruntime-fp32" and d["reason"] == "forced by the recipe (force: onnxruntime-fp32)"
    d = choose_runtime(RESNET50, force="openvino-bf16")
    assert d["chosen"] == "openvino-bf16" and "WARNING: it is slower than its FP32 counterpart" in d["reason"]
    with pytest.raises(RecipeError, match=r"force='openvino-qdq' is not among the measured candidates .*Fix: "):
        choose_runtime(RESNET50, force="openvino-qdq")


def test_nothing_within_budget_ships_the_fp32_reference():
    rows = [row("onnxruntime-fp32", None, 29.5, 876, ok=False), row("onnxruntime-int8", "onnxruntime-fp32", 10, 276,
                                                                     ok=False)]
    d = choose_runtime(rows)
    assert d["chosen"] == "onnxruntime-fp32" and "no candidate met the budget" in d["reason"]
    with pytest.raises(ValueError, match="reference 'onnxruntime-fp32' was not measured"):
        choose_runtime(rows[1:])


def test_accuracy_budget_rules():
    rules = dict(min_top1_agreement=90.0, min_sqnr_db=20.0, max_top1_drop=0.5)
    low_fidelity = {"top1_agreement": 82.0, "sqnr_db": 10.7}
    # a PTQ model must stay close to FP32; a QAT model with labels is judged by accuracy alone
    assert budget_notes(low_fidelity, -6.3, retrained=False, **rules) == ["agreement 82.00% < 90.0% at SQNR 10.7 dB < 20.0"]
    assert budget_notes(low_fidelity, -6.3, retrained=True, **rules) == []
    assert budget_notes(low_fidelity, 1.36, retrained=True, **rules) == ["top-1 drop 1.36 > 0.5 points"]
    # without labels even a QAT model falls back to fidelity; near-tied logits at high SQNR pass
    assert budget_notes(low_fidelity, None, retrained=True, **rules) == ["agreement 82.00% < 90.0% at SQNR 10.7 dB < 20.0"]
    assert budget_notes({"top1_agreement": 87.5, "sqnr_db": 36.0}, None, retrained=False, **rules) == []


# ---- one real run of the stage: tiny model, real Fashion-MNIST, real ONNX Runtime and OpenVINO -------------------

@pytest.fixture(scope="module")
def state(tmp_path_factory):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from deploykit.data import DataSplits
    from deploykit.data.fashion_mnist import MEAN, STD, load_fashion_mnist
    from deploykit.preprocessing import Preprocessing
    from deploykit.stages import PipelineState, StageInputs

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)).eval()
    pre = Preprocessing(input_size=(1, 28, 28), mean=(MEAN,), std=(STD,), class_names=[str(i) for i in range(10)])
    # disjoint slices of the test split: reading the 60k training file would cost more than the whole test
    test = load_fashion_mnist("test")
    idx = np.random.default_rng(0).permutation(len(test))
    data = DataSplits("fashion-mnist", train=test.subset(idx[300:364]), calibration=test.subset(idx[300:364]),
                      eval=test.subset(idx[:300]))
    inputs = StageInputs(calibration_fn=lambda: data.calibration.load(pre, np.arange(64)),
                         check_fn=lambda: data.eval.head(64, seed=1).load(pre, np.arange(64)))
    st = PipelineState(model=model, teacher=model, preprocessing=pre, workdir=tmp_path_factory.mktemp("art"),
                       data=data, log=lambda msg: None, inputs=inputs)
    st.ran = set()  # the stages that built models run once per module; select_runtime runs per test
    return st


def _run_stages(state, **select):
    from deploykit.stages import STAGES

    fast = dict(rounds=2, block_runs=2, batch_sizes=[1, 8], time_torch=False)
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # OpenVINO then cannot run BF16 but still lists it as a capability
        fast["bf16"] = "never"
    for name, cfg in (("export_onnx", {}), ("quantize_onnx", {}),
                      ("quantize_openvino", {"subset_size": 64, "format": "both"}),
                      ("select_runtime", {**fast, **select})):
        if name in state.ran and name != "select_runtime":
            continue
        stage = STAGES.get(name)
        facts = stage(stage.Config(**cfg)).run(state)
        state.ran.add(name)
    return facts


def test_stage_measures_every_candidate_and_records_its_choice(state):
    facts = _run_stages(state, evaluate="all")
    rows = {r["name"]: r for r in facts["candidates"]}
    assert {"onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8", "openvino-int8", "openvino-int8-onnx",
            "openvino-qdq"} <= set(rows)
    assert (rows["openvino-int8"]["model"], rows["openvino-int8-onnx"]["model"]) == ("model.ov.xml",
                                                                                      "model.nncf.int8.onnx")
    assert facts["inputs"] == 300 and facts["inputs_kind"] == "evaluation images"
    # Fidelity vs the FP32 reference by precision; argmax agreement is not asserted: this random net's top-two
    # logits are as little as 0.025 apart, inside INT8 error. Measured (AVX-512 VNNI / AVX2 oneDNN kernels):
    # FP32 134 dB and inf (float kernels ~1e-7 apart), BF16 47.8 dB, ONNX Runtime INT8 31.3-31.5 dB, OpenVINO INT8
    # 15.4 / 14.8 dB. 90% of this net's logit energy is input-independent, so even logits of the wrong inputs
    # (the reference shifted by one image) score 7.5 dB: hence no INT8 bound above 10 dB can be both safe and tight.
    min_sqnr = {"fp32": 60.0, "bf16": 30.0, "int8": 10.0}
    for r in rows.values():
        assert set(r["latency_ms"]) == {"bs1", "bs8"} and all(v > 0 for v in r["latency_ms"].values())
        assert r["sqnr_db"] > min_sqnr[r["precision"]], r
        assert r["top1"] is not None
    chosen = rows[facts["chosen"]]
    assert chosen["verdict"] == "eligible"
    eligible = [r for r in rows.values() if r["verdict"] == "eligible"]
    assert chosen["score"] == min(r["score"] for r in eligible)
    # the scores come from ratios paired by round: the reference against itself is exactly 1 in every round
    assert rows["onnxruntime-fp32"]["vs_reference"] == {"bs1": 1.0, "bs8": 1.0}
    for r in rows.values():
        assert r["score"] == pytest.approx(np.sqrt(r["vs_reference"]["bs1"] * r["vs_reference"]["bs8"]), abs=2e-4)
    from deploykit.report import render_markdown

    md = render_markdown({"models": {}, "data": {}, "stage_facts": {"select_runtime": facts}})
    ref_row = next(line for line in md.splitlines() if line.startswith("| onnxruntime-fp32 |"))
    assert "| 1.000 / 1.000 |" in ref_row and "x reference" in md
    rt = state.runtime
    assert (rt.backend, rt.variant, rt.model) == (chosen["backend"], chosen["name"], chosen["model"])
    assert state.precision == chosen["precision"] and state.onnx_path.suffix == ".onnx"
    assert (state.workdir / rt.model).is_file()


def test_stage_evaluates_only_what_can_change_the_choice(state):
    """evaluate: needed: the reference and then candidates fastest first, until the chosen one met the budget."""
    facts = _run_stages(state)
    rows = {r["name"]: r for r in facts["candidates"]}
    chosen = rows[facts["chosen"]]
    assert chosen["evaluated"] and chosen["verdict"] == "eligible" and rows["onnxruntime-fp32"]["evaluated"]
    skipped = [r for r in rows.values() if not r["evaluated"]]
    for r in skipped:  # not evaluated: ruled out by its timing alone, or a faster candidate already met the budget
        assert r["top1"] is None and r["verdict"] != "eligible"
        assert r["verdict"].endswith("did not pay") or (r["verdict"].startswith("not evaluated")
                                                        and r["score"] >= chosen["score"]), r
    # what was measured is kept for the report: the same loaded models and logits
    assert set(state.measured.logits) == {r["name"] for r in rows.values() if r["evaluated"]}
    assert state.measured.backends[facts["chosen"]] is not None


def test_stage_override_ships_the_forced_variant_with_its_ir(state):
    facts = _run_stages(state, force="openvino-int8")
    assert facts["chosen"] == "openvino-int8" and facts["reason"].startswith("forced by the recipe")
    assert state.runtime.model == "model.ov.xml" and state.runtime.model_files == ["model.ov.xml", "model.ov.bin"]
    assert state.runtime.files["openvino"] == "model.ov.xml"
    assert state.precision == "int8" and state.onnx_path.suffix == ".onnx"  # the current api still finds an ONNX


def test_unknown_override_is_rejected_by_the_recipe_schema():
    from deploykit.recipe import load_recipe

    with pytest.raises(DeployKitError, match="force"):
        load_recipe("int8-ptq").with_overrides({"stages.select_runtime.force": "tensorrt-int8"})
