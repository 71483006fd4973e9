"""Conv-BN fusion: fold each BatchNorm that directly follows a Conv into the Conv's weights.

The pairs are found by tracing the graph with torch.fx (so only a BN that consumes nothing but that
Conv's output is folded), then the original module is edited in place: the model keeps its class,
its state_dict names for everything else, and stays prunable and exportable. timm's BatchNormAct2d
(BN + activation in one module) is replaced by its activation.

Example:
    >>> fused, n = fuse_conv_bn(model)   # n = number of folded pairs
"""

from __future__ import annotations

from pydantic import Field

from ..errors import ParityError
from .config import StageConfig
from .base import PipelineState, Stage, register


def _tracer():
    import torch
    import torch.fx

    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules

        notrace_modules, notrace_fns = tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except ImportError:  # plain PyTorch models without timm
        notrace_modules, notrace_fns = (), ()

    class LeafTracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=notrace_fns)

        def is_leaf_module(self, m, qualname):
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Conv2d) + notrace_modules):
                return True
            return super().is_leaf_module(m, qualname)

    return LeafTracer()


def _set_submodule(root, qualname: str, new) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def find_conv_bn_pairs(model) -> list[tuple[str, str]]:
    """Qualified names of (conv, bn) pairs where bn's only input is conv's only use."""
    import torch

    graph = _tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), torch.nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (getattr(src, "op", None) == "call_module"
                and isinstance(model.get_submodule(src.target), torch.nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def fuse_conv_bn(model) -> tuple[object, int]:
    """Fold BNs into preceding convs, in place on an eval-mode model; returns (model, pairs folded)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        # timm's BatchNormAct2d applies drop + act after the BN: keep those, drop only the BN.
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                if m is not None and not isinstance(m, torch.nn.Identity)]
        _set_submodule(model, bn_name, torch.nn.Sequential(*tail) if tail else torch.nn.Identity())
    return model, len(pairs)


@register("fuse_bn")
class FuseBN(Stage):
    """Fold BatchNorm into Conv weights; check the fused model against the original."""

    class Config(StageConfig):
        atol: float = Field(1e-4, gt=0, description="max abs logit difference allowed, scaled by max|logit| if > 1")

    def run(self, state: PipelineState) -> dict:
        import numpy as np
        import torch

        bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in state.model.modules())
        if bns == 0:  # ViT, Swin, ConvNeXt...: nothing to fold; the model is left as it is, untraced
            return {"pairs_fused": 0, "batchnorms": 0, "note": "the model has no BatchNorm: nothing to fold"}
        x = torch.from_numpy(state.check_inputs()[:64])
        with torch.inference_mode():
            before = state.model.eval()(x)
        try:
            model, n = fuse_conv_bn(state.model)
        except Exception as err:  # untraceable model: ONNX Runtime still folds BN at load time
            state.log(f"[yellow]fuse_bn skipped: model is not fx-traceable ({type(err).__name__}: {err})[/]")
            return {"pairs_fused": 0, "batchnorms": bns, "skipped": str(err)}
        with torch.inference_mode():
            after = model(x)
        diff = float((before - after).abs().max())
        bound = self.config.atol * max(1.0, float(before.abs().max()))
        if not np.isfinite(diff) or diff > bound:
            raise ParityError(f"Conv-BN fusion changed the logits by {diff:.3g} (> {bound:.3g})",
                              fix="remove the fuse_bn stage from the recipe and report this model as a bug")
        state.model = model
        facts = {"pairs_fused": n, "batchnorms": bns, "max_abs_diff": diff, "tolerance": bound}
        if n < bns:  # e.g. LeViT's Linear + BatchNorm1d, DenseNet's pre-activation BN: ONNX Runtime/OpenVINO fold
            facts["note"] = f"{bns - n} BatchNorm layer(s) do not directly follow a Conv2d and stay as they are"
        return facts
