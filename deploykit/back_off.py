"""What the whole chain changes when its final model misses the accuracy budget against the original.

Two rungs, chosen from what the run itself showed:
  * distil twice as long, when the student was still improving at its last epoch (best validation macro-F1 at the
    last epoch, no early stop) and the float model missed by no more than the budget again: under-trained rather
    than too small (Lite0 on Fashion-MNIST-LT at 0.5x latency: validation macro-F1 rose at every one of 8 epochs and
    the float model missed a 0.5-point top-1 budget by 0.25);
  * otherwise prune less (``Prune.Config.relaxed``: half the pruning): a large miss, or a student that had stopped
    improving, needs capacity, not epochs (the same model distilled on the data's class mix lost 3.2 points at 0.5x,
    and 14 epochs lost the same as 8).
Each rung uses one of ``prune.back_off``; the caller re-runs the whole chain with the returned overrides.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackOff:
    overrides: dict          # recipe overrides, "stages.<stage>.<field>" -> value
    change: str              # what changed, for the log and the report


def prune_target(config) -> str:
    """The prune stage's target in words: 'latency 0.5x', 'ratio 0.45', 'MACs -50%'."""
    return (f"latency {config.target_latency}" if config.target_latency is not None else
            f"ratio {config.ratio:g}" if config.ratio is not None else f"MACs -{config.macs_reduction:.0%}")


def still_improving(distill_facts: dict | None) -> bool:
    """The distill stage's best validation epoch was its last one and it did not stop early."""
    if not distill_facts or not distill_facts.get("history"):
        return False
    return (not distill_facts.get("stopped_early")
            and distill_facts.get("best_epoch") == distill_facts["history"][-1]["epoch"])


def next_back_off(recipe, distill_facts: dict | None, near_miss: bool) -> BackOff | None:
    """The next rung for ``recipe`` after a miss, or None when the prune stage has no back-off left (or no prune).

    Example:
        >>> from deploykit.recipe import parse_recipe
        >>> r = parse_recipe({"version": 1, "name": "x", "stages": [{"prune": {"target_latency": "0.5x"}},
        ...                   {"distill": {"epochs": 8}}, "export_onnx"]})
        >>> facts = {"best_epoch": 8, "stopped_early": False, "history": [{"epoch": e} for e in range(1, 9)]}
        >>> next_back_off(r, facts, near_miss=True).change, next_back_off(r, facts, near_miss=False).change
        ('distill epochs 8 -> 16', 'pruning latency 0.5x -> latency 0.75x')
    """
    prune = recipe.stage("prune")
    if prune is None or prune.config.back_off < 1:
        return None
    left = {"stages.prune.back_off": prune.config.back_off - 1}
    distill = recipe.stage("distill")
    if distill is not None and near_miss and still_improving(distill_facts):
        e = distill.config.epochs
        return BackOff({**left, "stages.distill.epochs": 2 * e}, f"distill epochs {e} -> {2 * e}")
    relaxed = prune.config.relaxed()
    return BackOff({f"stages.prune.{k}": v for k, v in relaxed.model_dump().items()},
                   f"pruning {prune_target(prune.config)} -> {prune_target(relaxed)}")
