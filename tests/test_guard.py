"""Accuracy guard on real ONNX Runtime quantization: an outlier channel wrecks INT8, the guard repairs it."""

import numpy as np
import pytest
import torch

from deploykit.guard import guard_quantization, run_onnx, sensitivity_markdown
from deploykit.stages.export_onnx import export_onnx


def _fragile_model():
    """Conv net whose first activation has one channel ~1000x larger than the others.

    Per-tensor U8 activation quantization then spends its 256 levels on that channel and the small
    channels, which carry the decision, collapse: a real, well-known INT8 failure (activation outliers).
    """
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    with torch.no_grad():
        m[0].weight[0] *= 1000.0
        m[0].bias[0] = 1000.0
        m[2].weight[:, 0] *= 1e-3
        m[2].bias.zero_()
        m[6].weight *= 30.0                  # logits that vary with the input, so predictions are not constant
        m[6].bias.zero_()
    return m


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard")
    path = export_onnx(_fragile_model(), d / "m.fp32.onnx", (3, 16, 16))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    x = rng.standard_normal((200, 3, 16, 16)).astype(np.float32)
    return d, path, calib, x


def test_budget_zero_keeps_layers_in_float_and_meets_it(fragile):
    d, fp32, calib, x = fragile
    labels = run_onnx(fp32, x).argmax(1)               # the FP32 model is 100% right by construction
    facts = guard_quantization(fp32, d, [calib[:32], calib[32:]], x, labels, max_drop=0.0, log=lambda s: None,
                               latency_runs=3)
    assert facts["fp32_top1"] == 100.0
    assert facts["int8_all_drop"] > 5.0               # the outlier really breaks full INT8
    assert facts["met"] and facts["drop"] == 0.0 and facts["top1"] == 100.0
    assert 1 <= len(facts["kept_float"]) < facts["ranked_nodes"] + 1
    # the first kept node is the most sensitive one, and the table is sorted by error removed
    assert facts["kept_float"][0] == facts["sensitivity"][0]["node"]
    removed = [r["error_removed"] for r in facts["sensitivity"]]
    assert removed == sorted(removed, reverse=True)
    assert facts["ranked_nodes"] == 3                 # 2 Conv + 1 Gemm
    # the written model is what the facts claim
    out = run_onnx(d / "model.int8.guarded.onnx", x)
    assert float((out.argmax(1) == labels).mean() * 100) == pytest.approx(facts["top1"])
    assert facts["latency_ms"]["guarded"] > 0
    md = sensitivity_markdown(facts)
    assert "within budget" in md and facts["kept_float"][0] in md


def test_generous_budget_keeps_full_int8(fragile):
    d, fp32, calib, x = fragile
    facts = guard_quantization(fp32, d, [calib], x, None, max_drop=100.0, rank_always=False, log=lambda s: None)
    assert facts["met"] and facts["kept_float"] == [] and facts["sensitivity"] == []
    assert facts["top1"] == facts["int8_all_top1"]
