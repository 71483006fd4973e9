"""Stages hand each other typed values: report facts are for people, never input for the next stage."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from deploykit.stages import STAGES, PipelineState
from deploykit.variants import REFERENCE, RUNTIME_VARIANTS, RuntimeVariant, register_variant

STAGE_DIR = Path(__file__).parent.parent / "deploykit" / "stages"


def test_no_stage_module_reads_report_facts_or_private_caches():
    """The state has no facts to read; a stage module that reaches for them (or a private cache) is a regression."""
    assert "facts" not in PipelineState.__dataclass_fields__
    offenders = []
    for path in sorted(STAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("facts", "_cache"):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []


def _state(tmp_path, **models):
    st = PipelineState(model=None, teacher=None, preprocessing=None, workdir=tmp_path)
    for kind, name in models.items():
        st.add_model(kind.replace("_", "-"), tmp_path / name)
    return st


def test_runtime_candidates_are_the_registered_variants_whose_model_was_written(tmp_path):
    st = _state(tmp_path, fp32_onnx="model.fp32.onnx")
    assert [c.name for c in st.runtime_candidates()] == ["onnxruntime-fp32", "openvino-fp32"]
    assert "openvino-bf16" in [c.name for c in st.runtime_candidates(bf16=True)]
    st.add_model("int8-qdq", tmp_path / "model.int8.onnx")
    cands = {c.name: c for c in st.runtime_candidates()}
    # simplest first whatever order the backend modules were imported in (a latency tie goes to the earlier one)
    assert list(cands) == ["onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8", "openvino-qdq"]
    assert cands["openvino-qdq"].path.name == "model.int8.onnx" and cands["openvino-qdq"].variant.counterpart == "openvino-fp32"
    # a repaired model (accuracy_guard) replaces the one it repaired for every variant of that kind
    st.add_model("int8-qdq", tmp_path / "model.int8.guarded.onnx")
    assert {c.path.name for c in st.runtime_candidates() if c.variant.model == "int8-qdq"} == {"model.int8.guarded.onnx"}
    # a filter keeps the reference every score is relative to
    assert [c.name for c in st.runtime_candidates(["openvino-qdq"])] == [REFERENCE, "openvino-qdq"]


def test_a_new_variant_is_one_registration(tmp_path):
    """What a backend module does to offer a runtime: select_runtime's candidates and its config follow."""
    from deploykit.stages.select_runtime import SelectRuntime

    register_variant(RuntimeVariant("onnxruntime-int8-test", "onnxruntime", "int8-qdq", "int8", counterpart=REFERENCE))
    try:
        st = _state(tmp_path, fp32_onnx="a.onnx", int8_qdq="b.onnx")
        assert "onnxruntime-int8-test" in [c.name for c in st.runtime_candidates()]
        assert SelectRuntime.Config(force="onnxruntime-int8-test").force == "onnxruntime-int8-test"
    finally:
        RUNTIME_VARIANTS._items.pop("onnxruntime-int8-test")
    with pytest.raises(ValueError, match="unknown runtime variant 'onnxruntime-int8-test'"):
        SelectRuntime.Config(force="onnxruntime-int8-test")


def _weight_scale_sizes(path: Path) -> set[int]:
    """Sizes of the scales that dequantize 4-D (conv) weights: 1 per tensor, out-channels per channel."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return {inits[n.input[1]].size for n in g.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}


def test_renaming_every_report_field_changes_no_behaviour(tmp_path, monkeypatch):
    """Every stage's facts are renamed on the way out; the chain must still pass its typed values along:
    the guard re-quantizes with quantize_onnx's (non-default) settings and select_runtime measures the guarded model."""
    pytest.importorskip("sklearn")
    from helpers import save_tiny_checkpoint

    import deploykit
    from deploykit.recipe import parse_recipe

    for _, cls in STAGES.items():
        original = cls.run

        def renamed(self, state, _run=original):
            return {f"renamed_{k}": v for k, v in _run(self, state).items()}

        monkeypatch.setattr(cls, "run", renamed)
    # report.md is rendered from the facts' names: that is what they are for, and not what this test is about
    monkeypatch.setattr("deploykit.api.render_markdown", lambda report: "")

    recipe = parse_recipe({
        "data": {"name": "digits", "calibration_images": 32, "check_images": 32},
        "eval": {"enabled": False},
        "stages": ["fuse_bn", "export_onnx", {"quantize_onnx": {"per_channel": False}},
                   {"accuracy_guard": {"max_drop": 100, "rank_always": False, "images": 16}},
                   {"select_runtime": {"candidates": ["onnxruntime-int8"], "force": "onnxruntime-int8",
                                       "rounds": 1, "block_runs": 1, "batch_sizes": [1], "time_torch": False}}]})
    res = deploykit.compress(save_tiny_checkpoint(tmp_path / "t.pth"), recipe, out=tmp_path / "t.deploykit")
    facts = res.report["stage_facts"]
    assert "renamed_chosen" in facts["select_runtime"]  # the renaming really happened
    rows = {r["name"]: r for r in facts["select_runtime"]["renamed_candidates"]}
    assert rows["onnxruntime-int8"]["model"] == "model.int8.guarded.onnx"
    assert _weight_scale_sizes(res.path / "model.int8.guarded.onnx") == {1}   # per_channel: false reached the guard
    assert _weight_scale_sizes(res.path / "model.int8.onnx") == {1}
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert manifest["runtime"]["variant"] == "onnxruntime-int8"
    assert manifest["files"][manifest["runtime"]["model"]] == manifest["files"]["model.int8.guarded.onnx"]  # it ships
