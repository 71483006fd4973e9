"""The compressed float torch model for GPU targets, with its FP16/BF16 parity checked on held-out real images.

Writes ``model.torch.pth`` (``deploykit.torch_model_io``: weights + what rebuilding the fused/pruned model needs)
and makes the ``torch-cuda`` runtime the artifact's runtime, with the ONNX model as the alternative for ONNX
Runtime's CUDA/TensorRT providers and the TensorRT backend. Then it rebuilds the model from the file and runs it
through that runtime on ``device`` (auto: the GPU where there is one, else the CPU) in FP32 (must reproduce the
FP32 ONNX export) and in each checked precision, whose SQNR against FP32 must clear its bound.

Why these bounds: one rounding to a p-bit significand leaves a relative error of at most 2^-p (fp16 p=11: about
-66 dB; bf16 p=8: about -48 dB); a chain of a few dozen roundings adds their powers (-15 to -17 dB for 30-50).
Measured on 512 Fashion-MNIST test images on the CPU: resnet10t fp16 62.5 dB, bf16 43.9 dB; EfficientNet-Lite0
at 64x64 fp16 53.5 dB, bf16 38.0 dB. The defaults (fp16 40 dB, bf16 25 dB) sit 13 dB or more below those, for
other kernels and accumulation orders (GPU tensor cores, another CPU), while a wrong weight, a layer left in the
wrong type or an fp16 overflow gives far less (an overflow: inf/NaN, which fails any bound).

Example:
    recipe stages: [fuse_bn, export_onnx, {export_torch: {dtype: bf16}}]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ParityError
from .config import StageConfig
from .base import PipelineState, RuntimeChoice, Stage, register
from .export_onnx import check_parity

Precision = Literal["fp16", "bf16"]


@register("export_torch")
class ExportTorch(Stage):
    """state.model -> model.torch.pth for the torch-cuda runtime; rebuild checked, FP16/BF16 SQNR checked."""

    class Config(StageConfig):
        dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="the precision the runtime runs at")
        check: list[Precision] = Field(default_factory=lambda: ["fp16", "bf16"],
                                       description="precisions whose SQNR vs FP32 is measured (the shipped one "
                                                   "must pass; the others are reported)")
        min_sqnr_db_fp16: float = Field(40.0, description="fp16 vs FP32 on the held-out images (module docstring)")
        min_sqnr_db_bf16: float = Field(25.0, description="bf16 vs FP32 on the held-out images (module docstring)")
        device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the checks run (auto: GPU if any)")
        compile: bool | None = Field(None, description="runtime setting: torch.compile (None: on CUDA)")
        cuda_graphs: bool | None = Field(None, description="runtime setting: CUDA-graph replay (None: on CUDA "
                                                           "when compiling)")

    def run(self, state: PipelineState) -> dict:
        from ..artifact import FINAL_MODEL
        from ..backends import create_backend, run_batched
        from ..evaluate import fidelity
        from ..gpu import resolve_device
        from ..torch_model_io import TORCH_MODEL, save_torch_model

        c = self.config
        if state.onnx_fp32_path is None:
            raise ParityError("export_torch checks against the FP32 ONNX export, and there is none",
                              fix="put export_onnx before export_torch in the recipe")
        pre = state.preprocessing
        path = save_torch_model(state.model, state.workdir / TORCH_MODEL, in_chans=pre.channels,
                                input_size=pre.input_size, model_kwargs=state.model_kwargs,
                                extra={"dtype": c.dtype})
        device = resolve_device(c.device)
        x = state.check_inputs()
        ref = state.reference_check_logits()  # the FP32 ONNX export's logits (parity-checked against torch)

        def logits(precision: str):
            # eager: the checks test the weights and the precision, not the compiler (bench times the compiled one)
            be = create_backend("torch-cuda", path, precision=precision, device=device, compile=False)
            return run_batched(be.run, x)

        rebuilt = check_parity(ref, logits("fp32"), 1e-4 if device == "cpu" else 1e-3, 99.9,
                               "torch model rebuilt from model.torch.pth")
        facts = {"file": path.name, "size_mb": round(path.stat().st_size / 2**20, 3), "dtype": c.dtype,
                 "checked_on": device, "inputs": int(len(x)), "reference": "FP32 ONNX export",
                 "rebuilt_fp32": rebuilt, "precisions": {}}
        bounds = {"fp16": c.min_sqnr_db_fp16, "bf16": c.min_sqnr_db_bf16}
        for precision in dict.fromkeys([*c.check, *([c.dtype] if c.dtype != "fp32" else [])]):
            fid = fidelity(ref, logits(precision))
            fid.update({"min_sqnr_db": bounds[precision], "passed": bool(fid["sqnr_db"] >= bounds[precision])})
            facts["precisions"][precision] = fid
            if fid["passed"]:
                continue
            what = (f"{precision} torch model: SQNR {fid['sqnr_db']:.1f} dB vs FP32 on {len(x)} held-out inputs, "
                    f"below the {bounds[precision]:.0f} dB bound")
            if precision == c.dtype:
                raise ParityError(what, fix="ship fp32 (--set stages.export_torch.dtype=fp32) or the other "
                                            "precision, and report this model")
            state.log(f"[yellow]warning:[/] {what} (not the shipped precision)")
        settings = {k: v for k, v in (("compile", c.compile), ("cuda_graphs", c.cuda_graphs)) if v is not None}
        state.runtime = RuntimeChoice("torch-cuda", settings, model=TORCH_MODEL,
                                      files={"torch-cuda": TORCH_MODEL, "onnxruntime": FINAL_MODEL,
                                             "tensorrt": FINAL_MODEL})
        state.precision = c.dtype
        facts["runtime"] = {"backend": "torch-cuda", "settings": settings,
                            "alternatives": {"onnxruntime": FINAL_MODEL, "tensorrt": FINAL_MODEL}}
        return facts
