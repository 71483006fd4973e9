"""The base of every stage's typed config (a leaf module: recipes and stages both import it, it imports neither)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Base for every stage's config; ``version`` lets a stage migrate old recipes."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1


class Int8CheckConfig(StageConfig):
    """The fidelity check every INT8 PTQ stage (quantize_onnx, quantize_openvino) runs against the FP32 ONNX."""

    min_top1_agreement: float = Field(90.0, ge=0, le=100, description="vs FP32 ONNX; below this *and* below "
                                                                      "min_sqnr_db the model fails")
    # Argmax agreement alone is a poor alarm when logits are near-tied (random weights, 1000 classes on
    # synthetic inputs: timm resnet50 agreed on 87.5% at 36 dB SQNR); SQNR is not fooled by ties.
    min_sqnr_db: float = Field(20.0, description="SQNR vs FP32 that excuses a low agreement on near-tied logits")
    # Data-free check inputs are synthesized near decision boundaries, so agreement under-reads there and SQNR
    # is what transfers to real images: EfficientNet-Lite0 (ImageNet weights), data-free, NNCF INT8 17.8 dB on
    # the synthetic set and 19/20 real photos agreeing; ORT INT8 2.4 dB and 15/20 (bench/results/datafree_lite0.md)
    min_sqnr_db_data_free: float = Field(15.0, description="the SQNR floor when calibrating without data")
    on_fidelity_failure: Literal["error", "withhold"] = Field(
        "error", description="when the INT8 model fails the check: error (exit 2), or withhold it from the runtime "
                             "candidates, saying why (recipes that end in select_runtime ship another variant)")

    def fidelity_problem(self, fid: dict, data_free: bool) -> str | None:
        """What is wrong with an INT8 model of fidelity ``fid`` vs FP32 (None: it passes this stage's check)."""
        from ..evaluate import int8_fidelity_problem

        return int8_fidelity_problem(fid, self.min_top1_agreement,
                                     self.min_sqnr_db_data_free if data_free else self.min_sqnr_db)
