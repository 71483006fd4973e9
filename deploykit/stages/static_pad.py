"""Stage ``static_pad``: turn TF-style dynamic 'same' padding into fixed pads for the model's input size.

timm's ``tf_*`` models (EfficientNet-Lite among them) pad stride-2 convs asymmetrically, computing the
pads from the input shape at run time (``Conv2dSame``). Exported to ONNX that becomes a
Shape->...->Pad subgraph, and ONNX Runtime 1.32's INT8 path fuses it into ``QLinearConv`` with
wrong pads: EfficientNet-Lite0 at 32x32 fails with "QLinearConv ... Invalid input shape: {4,4}". With the
input size fixed by the artifact's preprocessing, the pads are constants: we compute them once per
layer and replace the module with a Conv2d subclass that applies a constant ``F.pad`` (same
weights, same state_dict keys, still prunable). Logits are checked to be unchanged.

Example (recipe): stages: [..., static_pad, fuse_bn, export_onnx, quantize_onnx]
"""

from __future__ import annotations

from pydantic import Field

from ..errors import ParityError
from .config import StageConfig
from .base import PipelineState, Stage, register


def _static_conv_class():
    import torch
    import torch.nn.functional as F

    class StaticPadConv2d(torch.nn.Conv2d):
        """Conv2d with a constant (left, right, top, bottom) zero pad before it."""

        def forward(self, x):
            return F.conv2d(F.pad(x, self.static_pad), self.weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)

    return StaticPadConv2d


def make_padding_static(model, input_size: tuple[int, int, int]) -> int:
    """Replace every dynamic-'same' conv (timm Conv2dSame) in place; returns how many were replaced."""
    import math

    import torch

    targets = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    if not targets:
        return 0
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: shapes.__setitem__(n, tuple(inp[0].shape[-2:])))
             for n, m in targets.items()]
    with torch.inference_mode():
        model.eval()(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    cls = _static_conv_class()
    for name, m in targets.items():
        pads = []
        for size, k, s, d in zip(shapes[name], m.kernel_size, m.stride, m.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        new = cls.__new__(cls)
        new.__dict__ = m.__dict__.copy()     # same parameters, same attributes, no re-initialisation
        new.static_pad = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(targets)


@register("static_pad")
class StaticPad(Stage):
    """Fixed pads for TF-'same' convs at the artifact's input size (ONNX Runtime INT8 needs them)."""

    class Config(StageConfig):
        atol: float = Field(1e-5, gt=0)

    def run(self, state: PipelineState) -> dict:
        import torch

        x = torch.from_numpy(state.check_inputs()[:16])
        with torch.inference_mode():
            before = state.model.eval()(x)
            n = make_padding_static(state.model, state.preprocessing.input_size)
            after = state.model(x)
        diff = float((before - after).abs().max())
        if diff > self.config.atol * max(1.0, float(before.abs().max())):
            raise ParityError(f"static padding changed the logits by {diff:.3g}",
                              fix="remove static_pad from the recipe and report this model")
        return {"convs_replaced": n, "max_abs_diff": diff}
