"""Export the torch model to ONNX with a dynamic batch axis, then prove ONNX Runtime agrees with torch.

Exporter: ``torchscript`` (torch.onnx.export(dynamo=False), opset 17) is the default because it took
0.3 s vs 7.8 s for the dynamo exporter on the reference model, writes one self-contained file, and is
the graph form ONNX Runtime's quantizer, nvidia-modelopt and TensorRT are tested against (modelopt's
QAT export fails under dynamo=True). ``dynamo`` is available for models only it can capture.

Example:
    >>> export_onnx(model, Path("m.onnx"), input_size=(3, 224, 224))
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ParityError
from .config import StageConfig
from .base import PipelineState, Stage, register

INPUT_NAME, OUTPUT_NAME = "input", "logits"
PARITY_INPUTS = 64  # inputs the PyTorch-vs-ONNX parity check runs


def export_onnx(model, path: Path, input_size: tuple[int, int, int], opset: int = 17,
                exporter: str = "torchscript", dynamic_batch: bool = True) -> Path:
    """Write ``model`` as a single-file ONNX at ``path`` (input 'input' NCHW, output 'logits')."""
    import onnx
    import torch

    model = model.eval()
    x = torch.zeros((2, *input_size), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices, not ours to fix
        if exporter == "dynamo":
            kw = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}} if dynamic_batch else {}
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(opset, 18),
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False, **kw)
            program.save(str(path), external_data=False)
        else:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)
    onnx.checker.check_model(str(path))
    return path


def check_parity(reference: np.ndarray, candidate: np.ndarray, atol: float, min_agreement: float, what: str) -> dict:
    """Compare logits; raise ParityError when they disagree beyond the stated tolerance."""
    from ..evaluate import fidelity

    bound = atol * max(1.0, float(np.abs(reference).max()))
    # agreement is judged where an error within the tolerance cannot flip the argmax (near-ties flip on kernel
    # rounding alone); a flip there means the error broke the tolerance on that input
    fid = fidelity(reference, candidate, tol=bound)
    if (not np.isfinite(fid["max_abs_logit_diff"]) or fid["max_abs_logit_diff"] > bound
            or fid["decided_agreement"] < min_agreement):
        raise ParityError(
            f"{what} disagrees with its source: max |diff| {fid['max_abs_logit_diff']:.3g} (limit {bound:.3g}), "
            f"top-1 agreement {fid['decided_agreement']:.2f}% on the {fid['decided_inputs']} inputs the source "
            f"decides clearly (limit {min_agreement}%)",
            fix="try exporter: dynamo or another opset in the recipe, or report the model as a bug",
        )
    return fid


@register("export_onnx")
class ExportOnnx(Stage):
    """torch -> ONNX (float32), checked against torch on held-out inputs with ONNX Runtime."""

    class Config(StageConfig):
        opset: int = Field(17, ge=13, le=23)
        exporter: Literal["torchscript", "dynamo"] = "torchscript"
        dynamic_batch: bool = True
        atol: float = Field(1e-4, gt=0, description="max abs logit diff vs torch, scaled by max|logit| if > 1")
        min_top1_agreement: float = Field(99.9, ge=0, le=100)

    def run(self, state: PipelineState) -> dict:
        import torch

        from ..backends import run_batched

        c = self.config
        path = export_onnx(state.model, state.workdir / "model.fp32.onnx", state.preprocessing.input_size,
                           c.opset, c.exporter, c.dynamic_batch)
        x = state.check_inputs()
        got = run_batched(state.backend("onnxruntime", path).run, x)
        # PyTorch eager is the slow side (ResNet-50: ~50 ms an image): an exactness check needs no more than 64
        with torch.inference_mode():
            ref = run_batched(lambda b: state.model(torch.from_numpy(b)).numpy(), x[:PARITY_INPUTS])
        fid = check_parity(ref, got[:PARITY_INPUTS], c.atol, c.min_top1_agreement, "exported ONNX")
        state.onnx_path = state.onnx_fp32_path = path
        state.reference_check_logits(got)
        state.add_model("fp32-onnx", path)
        state.precision = "fp32"
        return {"file": path.name, "opset": c.opset, "exporter": c.exporter, "parity": fid,
                "inputs_checked": len(ref)}
