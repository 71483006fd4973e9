"""Dependency-aware structured channel pruning with Torch-Pruning (DepGraph), rounded to multiples of 8.

DepGraph finds the groups of layers whose channels must be removed together (residual adds,
depthwise convs, squeeze-excite, LayerNorm in ConvNeXt), L2-magnitude importance ranks each group's
channels, and the pruner removes the weakest so that every pruned layer keeps a multiple of
``round_to`` channels (ragged counts fall off the fast vectorised kernels of ONNX Runtime/oneDNN).
The classifier head and the user's ``ignore`` layers keep their output channels.

Vision transformers: timm's standard ``Attention`` (ViT, DeiT, and the other models built from it) and
``nn.MultiheadAttention`` are pruned the way Torch-Pruning documents for timm ViTs: the qkv projection is
grouped by head (``num_heads``), each head keeps the same number of dimensions, and the module's ``head_dim`` /
``attn_dim`` / ``scale`` are updated afterwards; the embedding width and MLP hidden width shrink like channels.
Attention types whose head count or split sizes Torch-Pruning cannot resize (Swin's WindowAttention,
MobileViT's LinearSelfAttention, LeViT's and EfficientViT's attention, qk-normed or gated timm attention) are
refused up front (``check_prunable``, run by ``preflight`` before any stage), with one line naming the layer.

The target is a channel ratio (``ratio: 0.3`` = remove 30% of prunable channels per layer), a MACs reduction
(``macs_reduction: 0.5`` = remove half the multiply-accumulates, met by bisection on the ratio, each trial pruning a
fresh copy), or a latency measured on the runtime that will ship (``target_latency: 0.5x``, per-block ratios from a
timed sweep: ``deploykit.prune_latency``).

Example:
    >>> pruned, info = prune_model(model, (3, 64, 64), macs_reduction=0.5)
    >>> info["macs_after"] / info["macs_before"]   # ~0.5
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Literal

import numpy as np

from pydantic import Field, model_validator

from ..errors import DeployKitError, RecipeError, UnsupportedModelError
from .config import StageConfig
from .base import PipelineState, Stage, register

PRUNED_FILE = "model.pruned.pth"
# Attention modules pruned with head grouping (qkv projection, output reshape by attn_dim).
_TIMM_ATTENTION = "timm.layers.attention.Attention"
# Token mixers Torch-Pruning resizes inconsistently although their names say nothing of attention.
_UNSUPPORTED_MIXERS = {"LiteMLA": "EfficientViT's multi-scale linear attention"}


def _qualname(module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _is_attention(module) -> bool:
    import torch

    return (isinstance(module, torch.nn.MultiheadAttention) or type(module).__name__.endswith("Attention")
            or isinstance(getattr(module, "num_heads", None), int) or type(module).__name__ in _UNSUPPORTED_MIXERS)


def _supported_attention(module) -> str | None:
    """None when ``prune`` can resize this attention module, else why not."""
    import torch

    if isinstance(module, torch.nn.MultiheadAttention):
        return None
    if _qualname(module) == _TIMM_ATTENTION:
        extras = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(module, n, None),
                                                                            (torch.nn.Identity, type(None)))]
        if getattr(module, "gate", None) is not None:
            extras.append("gate")
        return f"its {'/'.join(extras)} layers are per head and not resized" if extras else None
    return _UNSUPPORTED_MIXERS.get(type(module).__name__, "Torch-Pruning does not resize its heads or split sizes")


def check_prunable(model) -> None:
    """Raise UnsupportedModelError, naming the first layer of each kind, when ``model`` has attention this stage
    cannot prune; cheap (walks the modules, runs nothing), so it runs before any stage does work."""
    bad: dict[str, list] = {}
    for name, m in model.named_modules():
        if not name or not _is_attention(m):
            continue
        # a block that *holds* a supported attention module and stores num_heads for it is not itself a mixer
        if not type(m).__name__.endswith("Attention") and any(
                _is_attention(c) and _supported_attention(c) is None for c in m.children()):
            continue
        why = _supported_attention(m)
        if why is not None:
            bad.setdefault(_qualname(m).removeprefix("timm.models."), [name, why, 0])[2] += 1
    if bad:
        kind, (first, why, n) = next(iter(bad.items()))
        more = f" and {n - 1} more" if n > 1 else ""
        others = f"; also {', '.join(list(bad)[1:])}" if len(bad) > 1 else ""
        raise UnsupportedModelError(
            f"prune cannot resize {kind} layers ('{first}'{more}{others}): {why}",
            fix="compress without pruning (--int8), or prune a CNN or a ViT/DeiT built from timm's Attention")


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


def _prune_once(model, input_size, ratio: float | dict, round_to: int, ignore: list[str], importance: str,
                global_pruning: bool):
    """Prune ``model`` in place: ``ratio`` for every prunable layer, or {module: ratio} (others untouched)."""
    import torch
    import torch_pruning as tp

    ignored = classifier_modules(model)
    dist = getattr(model, "head_dist", None)  # DeiT distilled: a second classifier
    if isinstance(dist, torch.nn.Linear):
        ignored.append(dist)
    names = dict(model.named_modules())
    for n in ignore:
        if n not in names:
            close = [k for k in names if n in k][:3]
            raise RecipeError(f"prune.ignore names {n!r}, which is not a module of this model",
                              fix=f"use a qualified module name{', e.g. ' + ', '.join(close) if close else ''}")
        ignored.append(names[n])
    imp = tp.importance.MagnitudeImportance(p=2 if importance == "l2" else 1)
    model.eval()
    # DepGraph traces the autograd graph: a copy of a teacher that distillation froze has no grad_fn to trace, and
    # Torch-Pruning then silently prunes nothing (seen when the chain re-ran after backing off)
    model.requires_grad_(True)
    # timm Attention: prune head dimensions, the same number in every head (Torch-Pruning's timm ViT recipe)
    attention = [m for m in model.modules() if _qualname(m) == _TIMM_ATTENTION]
    num_heads = {m.qkv: m.num_heads for m in attention}
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            num_heads[m] = m.num_heads
    with warnings.catch_warnings():
        # ViT's cls_token / pos_embed: Torch-Pruning prunes their last dimension, the embedding width, as it should
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        per_module = ratio if isinstance(ratio, dict) else None
        pruner = tp.pruner.BasePruner(model, torch.zeros(1, *input_size), importance=imp,
                                      pruning_ratio=0.0 if per_module else ratio, pruning_ratio_dict=per_module,
                                      ignored_layers=ignored, round_to=round_to, global_pruning=global_pruning,
                                      num_heads=num_heads, prune_head_dims=True, prune_num_heads=False)
        pruner.step()
    for m in attention:
        m.num_heads = pruner.num_heads[m.qkv]
        m.attn_dim = m.qkv.out_features // 3
        m.head_dim = m.attn_dim // m.num_heads
        m.scale = m.head_dim ** -0.5   # what the fused (SDPA) path uses for the new head size; keep both paths equal
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
    check_prunable(model)
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


def prune_to_latency_target(model, input_size: tuple[int, int, int], images: np.ndarray, c: "Prune.Config", *,
                            log: Callable[[str], None] = lambda s: None):
    """A pruned copy of ``model`` at ``c.target_latency`` with the prune stage's settings ``c`` (probe runtime,
    batch, clock, sweep cost, rounding, importance, ignored layers); returns (copy, latency facts). The stage and
    ``bench/latency_target_curve.py`` both call it, so the curve is what the stage would prune."""
    from ..prune_latency import LatencyProbe, LatencyTarget, prune_to_latency
    from ..prune_sensitivity import OutputSensitivity

    def prune_fn(m, ratios):
        return _prune_once(m, input_size, ratios, c.round_to, c.ignore, c.importance, c.global_pruning)

    probe = LatencyProbe(c.latency_runtime, input_size, c.latency_batch_size, images, clock=c.latency_clock)
    cost_fn = OutputSensitivity(model, images) if c.latency_cost == "output" else None
    return prune_to_latency(model, input_size, LatencyTarget.parse(c.target_latency), probe, prune_fn=prune_fn,
                            max_ratio=c.max_ratio, cost_fn=cost_fn, log=log)


@register("prune")
class Prune(Stage):
    """Structured pruning of ``state.model`` (the teacher stays whole); saves a rebuildable pruned file."""

    class Config(StageConfig):
        ratio: float | None = Field(None, gt=0, lt=1, description="fraction of channels to remove per layer")
        macs_reduction: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to remove")
        target_latency: str | None = Field(None, description="measured latency to reach: 0.5x (of the unpruned "
                                                               "model) or 3.2ms, on latency_runtime at "
                                                               "latency_batch_size")
        latency_runtime: Literal["openvino-int8", "openvino-fp32", "onnxruntime-fp32"] = Field(
            "openvino-int8", description="the runtime variant the latency target is measured on")
        latency_batch_size: int = Field(32, ge=1, description="the batch size the latency target is measured at")
        latency_clock: Literal["wall", "cpu", "auto"] = Field(
            "wall", description="wall: what the user waits for; auto: CPU time for calls of 2 ms and more (a shared "
                                "machine); cpu: always CPU time (deploykit.prune_latency.LatencyProbe.time)")
        latency_cost: Literal["output", "weight_mass"] = Field(
            "output", description="latency target: what pruning a block costs, against the time it buys. output: "
                                  "how far the outputs move on the calibration images, BN re-estimated, every class "
                                  "weighing the same (deploykit.prune_sensitivity); weight_mass: L2 mass removed")
        max_ratio: float = Field(0.8, gt=0, lt=1, description="latency target: most channels removed from one block")
        # 8, measured (bench/results/channel_rounding*.md, Intel Xeon AVX-512 VNNI/AMX, one 64->C->C->64 conv block,
        # C = 96..128 in steps of 4, batch 32): OpenVINO INT8 showed no step between multiples of 4, 8, 16 and 64
        # (16x16: 1.66-1.78 ms; 32x32: 7.2-7.8 ms, flat in C), ONNX Runtime INT8 none either (its times rose with C
        # but out of order: 104 channels 1.77 ms, 112 2.99, 128 2.20 at 16x16). Wider multiples buy nothing there, so
        # 8 stays (an AVX2 register's int32 lanes); AVX2-only CPUs were not measured.
        round_to: int = Field(8, ge=1, description="pruned channel counts are multiples of this")
        back_off: int = Field(2, ge=0, description="times the whole chain re-runs when the final model misses the "
                                                   "accuracy budget against the original: with twice the KD epochs "
                                                   "or half the pruning (deploykit.back_off)")
        # A measured plan replayed: the sweep's allocation is chosen on timings that drift 1.5x on a shared machine,
        # so two runs with the same target prune different blocks. Given the ratios an earlier run recorded, the
        # pruned model is the same, bit for bit, and a distillation cached for it resumes instead of re-training.
        plan: dict[str, float] | None = Field(None, description="{block: fraction of channels to remove}, e.g. an "
                                                                 "earlier report's prune.latency.unit_ratios: prune "
                                                                 "exactly so, no sweep; with target_latency the "
                                                                 "result is still timed against the target")
        importance: Literal["l2", "l1"] = "l2"
        global_pruning: bool = False
        ignore: list[str] = Field(default_factory=list, description="module names never pruned (head is always kept)")

        @model_validator(mode="after")
        def _one_target(self):
            given = [k for k in ("ratio", "macs_reduction", "target_latency") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"give one of ratio, macs_reduction, target_latency, not {' and '.join(given)}")
            if self.plan is not None:
                if given and given != ["target_latency"]:
                    raise ValueError(f"a plan prunes by its own ratios: drop {given[0]} (target_latency may stay, "
                                     "to time the result)")
                bad = {k: v for k, v in self.plan.items() if not 0 <= v < 1}
                if bad or not self.plan:
                    raise ValueError(f"plan ratios must be fractions in [0, 1) of a block's channels, got "
                                     f"{bad or 'an empty plan'}")
            elif not given:
                self.macs_reduction = 0.5
            if self.target_latency is not None:
                from ..prune_latency import LatencyTarget

                try:
                    LatencyTarget.parse(self.target_latency)
                except RecipeError as err:
                    raise ValueError(f"{err.problem}; {err.fix}") from None
            return self

        def relaxed(self) -> "Prune.Config":
            """Half the pruning (a latency target halfway to the unpruned model's), one back-off fewer."""
            from ..prune_latency import LatencyTarget

            upd: dict = {"back_off": self.back_off - 1}
            if self.target_latency is not None:
                t = LatencyTarget.parse(self.target_latency)
                upd["target_latency"] = (f"{round((1 + t.relative) / 2, 4)}x" if t.relative is not None
                                         else f"{round(t.ms * 1.5, 4)}ms")
            if self.plan is not None:
                upd["plan"] = {k: round(v / 2, 4) for k, v in self.plan.items()}
            elif self.ratio is not None:
                upd["ratio"] = self.ratio / 2
            elif self.macs_reduction is not None:
                upd["macs_reduction"] = self.macs_reduction / 2
            return self.model_copy(update=upd)

    def preflight(self, model) -> None:
        check_prunable(model)

    def run(self, state: PipelineState) -> dict:
        import torch

        from ..pruned_io import save_pruned, timm_arch

        c = self.config
        pre = state.preprocessing
        x = torch.from_numpy(state.check_inputs()[:8])
        arch = timm_arch(state.model) or type(state.model).__name__
        try:
            if c.plan is not None:
                model, facts = self._prune_by_plan(state)
            elif c.target_latency is not None:
                model, facts = self._prune_to_latency(state)
            else:
                model, facts = prune_model(state.model, pre.input_size, ratio=c.ratio,
                                           macs_reduction=c.macs_reduction, round_to=c.round_to, ignore=c.ignore,
                                           importance=c.importance, global_pruning=c.global_pruning)
            with torch.inference_mode():
                out = model.eval()(x)
                ref = state.teacher(x)
        except DeployKitError:
            raise
        except Exception as err:  # a layer Torch-Pruning resized inconsistently: one line, not a traceback
            raise UnsupportedModelError(
                f"pruning {arch} failed: {type(err).__name__}: {' '.join(str(err).split())[:240]}",
                fix="list the layer it names (or its block) in prune.ignore, or compress without pruning "
                    "(--int8)") from None
        if out.shape != ref.shape:
            raise UnsupportedModelError(f"pruning {arch} changed the output shape {tuple(ref.shape)} -> "
                                        f"{tuple(out.shape)}", fix="compress without pruning (--int8)")
        state.model, state.weights_changed = model, True
        if timm_arch(model):
            save_pruned(model, state.workdir / PRUNED_FILE, num_classes=out.shape[1], in_chans=pre.channels,
                        model_kwargs=state.model_kwargs)
            facts["file"] = PRUNED_FILE
        facts["top1_agreement_before_finetune"] = round(float((out.argmax(1) == ref.argmax(1)).float().mean()) * 100, 2)
        lat = facts.get("latency")
        state.log(f"pruned: MACs {facts['macs_before'] / 1e6:.1f}M -> {facts['macs_after'] / 1e6:.1f}M, "
                  f"params {facts['params_before'] / 1e6:.2f}M -> {facts['params_after'] / 1e6:.2f}M"
                  + (f", latency {lat['measured_ratio']:.2f}x on {lat['runtime']} bs{lat['batch_size']} "
                     f"(target {lat['target']})" if lat else ""))
        return facts

    def _prune_to_latency(self, state: PipelineState):
        """Latency-targeted pruning (``deploykit.prune_latency``) with this stage's pruner settings."""
        c, size = self.config, state.preprocessing.input_size
        check_prunable(state.model)
        model, latency = prune_to_latency_target(state.model, size, state.calibration_inputs(), c, log=state.log)
        return model, self._size_facts(state.model, model, size, latency)

    def _prune_by_plan(self, state: PipelineState):
        """Prune a copy by ``plan`` ({block: ratio}); with a latency target, time it beside the unpruned model once."""
        from ..prune_latency import LatencyProbe, LatencyTarget, prunable_units, timed_plan

        c, size = self.config, state.preprocessing.input_size
        model = copy.deepcopy(state.model)
        units = [n for n, _ in prunable_units(model, classifier_modules(model))]
        unknown = [n for n in c.plan if n not in units]
        if unknown:
            raise RecipeError(f"prune.plan names {', '.join(map(repr, unknown[:3]))}, not a prunable block of this "
                              "model", fix=f"use the blocks an earlier report of this model lists under "
                                           f"prune.latency.unit_ratios: {', '.join(units[:12])}")
        modules = dict(model.named_modules())
        _prune_once(model, size, {modules[n]: r for n, r in c.plan.items() if r > 0}, c.round_to, c.ignore,
                    c.importance, c.global_pruning)
        latency = None
        if c.target_latency is not None:
            probe = LatencyProbe(c.latency_runtime, size, c.latency_batch_size, state.calibration_inputs(),
                                 clock=c.latency_clock)
            latency = timed_plan(state.model, model, LatencyTarget.parse(c.target_latency), probe, c.plan)
        return model, {**self._size_facts(state.model, model, size, latency), "plan": dict(c.plan)}

    def _size_facts(self, before, after, size: tuple[int, int, int], latency: dict | None) -> dict:
        """MACs and parameters before/after and the pruner settings (the latency-driven and plan paths)."""
        c = self.config
        macs0, params0 = count_macs_params(before, size)
        macs1, params1 = count_macs_params(after, size)
        return {"ratio": None, "macs_before": macs0, "macs_after": macs1, "macs_kept": round(macs1 / macs0, 4),
                "params_before": params0, "params_after": params1, "round_to": c.round_to,
                "ignored": list(c.ignore), "latency": latency}
