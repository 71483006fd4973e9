"""Dependency-aware structured channel pruning with Torch-Pruning (DepGraph), rounded to multiples of 8.

DepGraph finds the groups of layers whose channels must be removed together (residual adds,
depthwise convs, squeeze-excite, LayerNorm in ConvNeXt), L2-magnitude importance ranks each group's
channels, and the pruner removes the weakest so that every pruned layer keeps a multiple of
``round_to`` channels (ragged counts fall off the fast vectorised kernels of ONNX Runtime/oneDNN).
The classifier head and the user's ``ignore`` layers keep their output channels.

The target is either a channel ratio (``ratio: 0.3`` = remove 30% of prunable channels per layer) or
a MACs reduction (``macs_reduction: 0.5`` = remove half the multiply-accumulates): the latter is met
by bisection on the ratio, each trial pruning a fresh copy.

Example:
    >>> pruned, info = prune_model(model, (3, 64, 64), macs_reduction=0.5)
    >>> info["macs_after"] / info["macs_before"]   # ~0.5
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np

from pydantic import Field, model_validator

from ..errors import RecipeError
from .config import StageConfig
from .base import PipelineState, Stage, register

PRUNED_FILE = "model.pruned.pth"


def count_macs_params(model, input_size: tuple[int, int, int]) -> tuple[int, int]:
    """(MACs, parameters) for one image of ``input_size`` (C, H, W)."""
    import torch
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_size))
    model.train(was_training)
    return int(macs), int(params)


def classifier_modules(model) -> list:
    """The modules producing class logits: timm's ``get_classifier()``, else the last Linear."""
    import torch

    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, torch.nn.Module) and any(p.numel() for p in head.parameters()):
            return [head]
    last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return last[-1:]


def _prune_once(model, input_size, ratio: float, round_to: int, ignore: list[str], importance: str,
                global_pruning: bool):
    import torch
    import torch_pruning as tp

    ignored = classifier_modules(model)
    names = dict(model.named_modules())
    for n in ignore:
        if n not in names:
            close = [k for k in names if n in k][:3]
            raise RecipeError(f"prune.ignore names {n!r}, which is not a module of this model",
                              fix=f"use a qualified module name{', e.g. ' + ', '.join(close) if close else ''}")
        ignored.append(names[n])
    imp = tp.importance.MagnitudeImportance(p=2 if importance == "l2" else 1)
    model.eval()
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *input_size), importance=imp, pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=round_to, global_pruning=global_pruning)
    pruner.step()
    return model


def prune_model(model, input_size: tuple[int, int, int], *, ratio: float | None = None,
                macs_reduction: float | None = None, round_to: int = 8, ignore: list[str] | None = None,
                importance: str = "l2", global_pruning: bool = False, tolerance: float = 0.02,
                max_trials: int = 8):
    """Prune ``model`` in place to a channel ratio or a MACs reduction; returns (model, facts).

    Args:
        ratio: fraction of each prunable layer's channels to remove.
        macs_reduction: fraction of MACs to remove; the ratio is found by bisection (within ``tolerance``).
    """
    if (ratio is None) == (macs_reduction is None):
        raise RecipeError("prune needs exactly one of ratio or macs_reduction", fix="set one, e.g. ratio: 0.5")
    ignore = list(ignore or [])
    macs0, params0 = count_macs_params(model, input_size)
    trials = []
    if ratio is None:
        keep = 1.0 - macs_reduction
        lo, hi, best = 0.0, 0.95, None
        # MACs scale roughly as (1 - ratio)^a with a ~ 2 (both in and out channels shrink): start there,
        # refit a after each trial (a secant step), and fall back to bisection if it leaves the bracket.
        a = 2.0
        for _ in range(max_trials):
            r = 1.0 - keep ** (1.0 / a)
            if not lo < r < hi:
                r = (lo + hi) / 2
            trial = _prune_once(copy.deepcopy(model), input_size, r, round_to, ignore, importance, global_pruning)
            kept = count_macs_params(trial, input_size)[0] / macs0
            trials.append({"ratio": round(r, 4), "macs_kept": round(kept, 4)})
            if best is None or abs(kept - keep) < abs(best[1] - keep):
                best = (r, kept)
            if abs(kept - keep) <= tolerance:
                break
            lo, hi = (r, hi) if kept > keep else (lo, r)
            if hi - lo < 2e-3:  # round_to makes MACs a step function of the ratio: no closer value exists
                break
            if 0 < kept < 1:
                a = max(0.5, min(4.0, float(np.log(kept) / np.log(1.0 - r))))
        ratio = best[0]
    _prune_once(model, input_size, ratio, round_to, ignore, importance, global_pruning)
    macs1, params1 = count_macs_params(model, input_size)
    return model, {"ratio": round(ratio, 4), "macs_before": macs0, "macs_after": macs1,
                   "macs_kept": round(macs1 / macs0, 4), "params_before": params0, "params_after": params1,
                   "round_to": round_to, "ignored": ignore, "search": trials}


@register("prune")
class Prune(Stage):
    """Structured pruning of ``state.model`` (the teacher stays whole); saves a rebuildable pruned file."""

    class Config(StageConfig):
        ratio: float | None = Field(None, gt=0, lt=1, description="fraction of channels to remove per layer")
        macs_reduction: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to remove")
        round_to: int = Field(8, ge=1, description="pruned channel counts are multiples of this")
        importance: Literal["l2", "l1"] = "l2"
        global_pruning: bool = False
        ignore: list[str] = Field(default_factory=list, description="module names never pruned (head is always kept)")

        @model_validator(mode="after")
        def _one_target(self):
            if self.ratio is not None and self.macs_reduction is not None:
                raise ValueError("give ratio or macs_reduction, not both")
            if self.ratio is None and self.macs_reduction is None:
                self.macs_reduction = 0.5
            return self

    def run(self, state: PipelineState) -> dict:
        import torch

        from ..pruned_io import save_pruned, timm_arch

        c = self.config
        pre = state.preprocessing
        x = torch.from_numpy(state.check_inputs()[:8])
        model, facts = prune_model(state.model, pre.input_size, ratio=c.ratio, macs_reduction=c.macs_reduction,
                                   round_to=c.round_to, ignore=c.ignore, importance=c.importance,
                                   global_pruning=c.global_pruning)
        with torch.inference_mode():
            out = model.eval()(x)
            ref = state.teacher(x)
        if out.shape != ref.shape:
            raise RuntimeError(f"pruning changed the output shape {tuple(ref.shape)} -> {tuple(out.shape)}")
        state.model = model
        if timm_arch(model):
            save_pruned(model, state.workdir / PRUNED_FILE, num_classes=out.shape[1], in_chans=pre.channels)
            facts["file"] = PRUNED_FILE
        facts["top1_agreement_before_finetune"] = round(float((out.argmax(1) == ref.argmax(1)).float().mean()) * 100, 2)
        state.log(f"pruned: MACs {facts['macs_before'] / 1e6:.1f}M -> {facts['macs_after'] / 1e6:.1f}M, "
                  f"params {facts['params_before'] / 1e6:.2f}M -> {facts['params_after'] / 1e6:.2f}M")
        return facts
