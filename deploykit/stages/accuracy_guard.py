"""Stage ``accuracy_guard``: keep the INT8 model within a top-1 budget of FP32 (see deploykit.guard).

Place it right after ``quantize_onnx``. It re-quantizes with the same settings, keeping the most
quantization-sensitive nodes in float until the drop on held-out TRAIN images is within ``max_drop``.

Example (recipe):
    stages: [fuse_bn, export_onnx, quantize_onnx, {accuracy_guard: {max_drop: 0.5}}]
"""

from __future__ import annotations

import numpy as np

from ..errors import ParityError
from ..guard import GUARDED_FILE, GuardConfig, guard_quantization
from .base import PipelineState, QuantSettings, Stage, register


@register("accuracy_guard")
class AccuracyGuard(Stage):
    """Top-1 budget for INT8: sensitivity-ranked fallback of layers to float."""

    Config = GuardConfig

    def run(self, state: PipelineState) -> dict:
        c = self.config
        if state.onnx_fp32_path is None or state.precision != "int8":
            raise ParityError("accuracy_guard needs an INT8 model and its FP32 ONNX",
                              fix="put accuracy_guard right after quantize_onnx in the recipe")
        # re-quantize exactly as quantize_onnx did (its typed settings; defaults when the INT8 model came elsewhere)
        quant_kw = (state.quantization or QuantSettings()).as_kwargs()
        if state.data is not None:
            train = state.data.train
            val_idx = state.validation_indices
            if val_idx is not None and len(val_idx):
                judge, kind = train.subset(val_idx).head(c.images, seed=11), "train images held out by distill"
            else:
                judge, kind = train.head(c.images, seed=11), "seeded slice of the train split"
            x = judge.load(state.preprocessing, np.arange(len(judge)))
            labels = judge.labels
        else:
            x, labels, kind = state.check_inputs(), None, "check inputs, FP32 predictions as labels (no data)"
        calib = state.calibration_inputs()
        facts = guard_quantization(state.onnx_fp32_path, state.workdir, (calib[i:i + 32] for i in range(0, len(calib), 32)),
                                   x, labels, max_drop=c.max_drop, rank_always=c.rank_always, max_kept=c.max_kept,
                                   batch_size=c.batch_size, log=state.log, quant_kw=quant_kw,
                                   latency_batch=c.latency_batch, latency_runs=c.latency_runs)
        facts["judged_on"] = kind
        facts["path"] = GUARDED_FILE
        if not facts["met"]:
            state.log(f"[yellow]accuracy_guard: could not meet the {c.max_drop}-point budget "
                      f"(best drop {facts['drop']:.2f}); wrote the best model found[/]")
        state.onnx_path = state.workdir / GUARDED_FILE
        state.add_model("int8-qdq", state.onnx_path)  # the repaired model replaces the one it repaired
        return facts
