"""Prune to a *measured* latency target: how much time each block buys, measured on the runtime that will ship.

MACs are a poor proxy for CPU latency (Torch-Pruning's own ResNet-50 table: MACs halved bought 1.35x; a
64x64 EfficientNet-Lite0 at batch 1 on OpenVINO INT8 spends most of its 0.8 ms in per-layer overhead), so the
prune stage can aim at a latency instead:

1. **Sweep.** Each *unit* (a stage or block: ``blocks.3``, ``layer2.0``; ``prunable_units``) is pruned alone at
   ``probe_ratio`` on a copy; each copy is exported, quantized as the target runtime runs it (``LatencyProbe``) and
   timed **in a pair with the unpruned model** with ``deploykit.measure`` (the machine's speed drifts 1.5x in half
   an hour, so only ratios measured together mean anything; the ratio is paired by round, ``measure.Ratio``). A
   unit's *saving* is the
   fraction of the unpruned latency it removed; its *cost* is what ``cost_fn`` says the pruned copy lost: by
   default how far its outputs moved (``deploykit.prune_sensitivity.OutputSensitivity``), else the fraction of the
   model's L2 weight mass (the magnitude criterion the pruner itself ranks channels by) that went with it.
2. **Allocate.** Each unit's ratio is proportional to its saving per unit of cost (capped at ``max_ratio``);
   the predicted latency ratio is ``1 - sum(saving_u * g(r_u) / g(probe_ratio))`` with ``g(r) = 1 - (1 - r)^2``
   (a block pruned on both sides keeps ``(1 - r)^2`` of its multiply-adds); the scale is bisected until the
   prediction meets the target.
3. **Verify.** The allocation is pruned and measured beside the unpruned model; when the measurement misses
   the target by more than ``tolerance`` the predicted ratio asked for is corrected (secant on measured ratios) and
   measured again. A target that every unit at ``max_ratio`` still misses is refused. Every trial's predicted and
   measured ratio lands in the report.

Example:
    >>> t = LatencyTarget.parse("0.5x")
    >>> probe = LatencyProbe("openvino-int8", (3, 64, 64), 32, x)
    >>> pruned, facts = prune_to_latency(model, (3, 64, 64), t, probe, prune_fn=fn)
    >>> facts["measured_ratio"]        # ~0.5: pruned latency / unpruned latency, same run
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import RecipeError

# The runtimes a latency target can be measured on (runtime variant names, see deploykit.variants).
PROBE_RUNTIMES = ("openvino-int8", "openvino-fp32", "onnxruntime-fp32")


@dataclass(frozen=True)
class LatencyTarget:
    """``relative`` (0.5 = half the unpruned model's latency) or ``ms`` (absolute, at the probe batch size)."""

    relative: float | None = None
    ms: float | None = None

    @classmethod
    def parse(cls, text: str | float) -> "LatencyTarget":
        """'0.5x' -> relative 0.5; '3.2ms' -> 3.2 ms; a bare number < 1 is relative, else milliseconds."""
        s = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)(x|ms)?", s)
        if not m:
            raise RecipeError(f"latency target {text!r} is neither a ratio nor milliseconds",
                              fix="write e.g. 0.5x (half the unpruned latency) or 3.2ms")
        value, unit = float(m.group(1)), m.group(2) or ("x" if float(m.group(1)) < 1 else "ms")
        if value <= 0 or (unit == "x" and value >= 1):
            raise RecipeError(f"latency target {text!r} is out of range",
                              fix="a ratio between 0 and 1 (0.5x), or a positive number of ms")
        return cls(relative=value) if unit == "x" else cls(ms=value)

    def ratio(self, base_ms: float) -> float:
        """The target as a fraction of the unpruned latency ``base_ms``."""
        return self.relative if self.relative is not None else self.ms / base_ms

    def __str__(self) -> str:
        return f"{self.relative}x" if self.relative is not None else f"{self.ms}ms"


def prunable_units(model, ignored: list) -> list[tuple[str, object]]:
    """The blocks the sweep prunes one at a time: each top-level child holding prunable layers, split one level
    further when it is a container of several blocks (timm ``blocks`` -> ``blocks.0`` .. ``blocks.6``; ResNet
    ``layer1`` -> ``layer1.0``, ``layer1.1``). Units made only of ignored layers (the classifier) are left out."""
    import torch

    prunable = (torch.nn.Conv2d, torch.nn.Linear)
    skip = {id(m) for m in ignored}

    def has_prunable(mod) -> bool:
        return any(isinstance(m, prunable) and id(m) not in skip for m in mod.modules())

    units = []
    for name, child in model.named_children():
        if not has_prunable(child):
            continue
        kids = list(child.named_children())
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)) and len(kids) > 1:
            units += [(f"{name}.{k}", m) for k, m in kids if has_prunable(m)]
        else:
            units.append((name, child))
    return units


def weight_mass(model) -> float:
    """Sum of squared Conv/Linear weights: the L2 magnitude the pruner ranks channels by."""
    import torch

    return float(sum(float(m.weight.detach().double().pow(2).sum()) for m in model.modules()
                     if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))))


class LatencyProbe:
    """Latency of torch models on one runtime variant at one batch size, always timed beside each other.

    ``openvino-int8`` quantizes with NNCF on ``calibration`` (a few images: the ranges barely move the kernels'
    speed, and the probe is rebuilt for every trial); ``openvino-fp32`` and ``onnxruntime-fp32`` run the export.
    """

    def __init__(self, runtime: str, input_size: tuple[int, int, int], batch_size: int, calibration: np.ndarray,
                 threads: int | None = None, max_rounds: int = 8, time_budget_s: float = 3.0,
                 clock: str = "wall"):
        if runtime not in PROBE_RUNTIMES:
            raise RecipeError(f"latency runtime {runtime!r} is not one of {', '.join(PROBE_RUNTIMES)}",
                              fix=f"set prune.latency_runtime to one of {', '.join(PROBE_RUNTIMES)}")
        if clock not in ("wall", "cpu", "auto"):
            raise RecipeError(f"latency clock {clock!r} is not wall, cpu or auto", fix="set prune.latency_clock")
        self.runtime, self.input_size, self.batch_size = runtime, tuple(input_size), int(batch_size)
        self.calibration = np.asarray(calibration[:16], dtype=np.float32)
        self.threads, self.max_rounds, self.time_budget_s = threads, max_rounds, time_budget_s
        self._dir = tempfile.TemporaryDirectory(prefix="deploykit-probe-")
        self._n = 0
        self.use_clock = clock
        self.clock = "wall"  # the clock the last timing compared by

    def build(self, model) -> Callable[[np.ndarray], np.ndarray]:
        """Export (and quantize) ``model``; returns the runtime's run function."""
        from .backends import create_backend
        from .stages.export_onnx import export_onnx

        self._n += 1
        d = Path(self._dir.name)
        onnx = export_onnx(copy.deepcopy(model).eval(), d / f"m{self._n}.onnx", self.input_size)
        if self.runtime == "openvino-int8":
            from .stages.quantize_openvino import quantize_openvino

            path = quantize_openvino(onnx, d / f"m{self._n}.xml", self.calibration, subset_size=len(self.calibration))
            return create_backend("openvino", path, threads=self.threads, precision="int8").run
        backend = self.runtime.split("-")[0]
        return create_backend(backend, onnx, threads=self.threads).run

    def time(self, fns: dict[str, Callable]) -> dict[str, float]:
        """Median ms of each run function, timed side by side in alternating blocks (no elimination: every
        variant's median is used).

        ``clock`` wall (default) compares what the user waits for. CPU time hides a model that uses its threads less
        well: the 64x64 ResNet-10-T pruned to 0.48x by CPU time measured 0.64x by wall time against the original
        (OpenVINO INT8, batch 32, quiet Xeon), a 33% miss of the prediction. ``auto`` compares calls of 2 ms and more
        by the process's CPU time, as the latency gate does (``AUTO_CLOCK_MS``), for a shared machine: another job
        stretches wall time by whenever it happens to run (a sweep on the 64x64 Lite0 under a load average of 4 saw
        2-6% savings per block by wall time where a quiet run saw 7-15%); ``cpu`` always.
        """
        run = self._run(fns)
        return {n: self._median(rec) for n, rec in run.records.items()}

    def ratio(self, fn: Callable, base_fn: Callable) -> dict[str, float]:
        """``fn`` beside ``base_fn``: {"ratio": fn's latency / base_fn's, paired by round (``measure.Ratio``: a
        machine that changes speed between rounds cancels), "ms": fn's median, "base_ms": base_fn's median}."""
        run = self._run({"base": base_fn, "fn": fn})
        return {"ratio": run.ratio("fn", "base", clock=self.clock).value, "ms": self._median(run.records["fn"]),
                "base_ms": self._median(run.records["base"])}

    def _median(self, rec) -> float:
        """A record's median on the clock the last timing compared by."""
        return rec.cpu_p50 if self.clock == "cpu" else rec.p50

    def _run(self, fns: dict[str, Callable]):
        from .gate import auto_clock
        from .measure import time_variants

        x = np.resize(self.calibration, (self.batch_size, *self.input_size)).astype(np.float32)
        run = time_variants(fns, x, max_rounds=self.max_rounds, min_rounds=min(4, self.max_rounds), eliminate=False,
                            block_s=0.15, time_budget_s=self.time_budget_s)
        self.clock = (auto_clock(min(rec.p50 for rec in run.records.values())) if self.use_clock == "auto"
                      else self.use_clock)
        return run

    def describe(self) -> str:
        return f"{self.runtime} at batch {self.batch_size}"


class Allocation:
    """Per-unit pruning ratios from a sweep: each unit's ratio is proportional to its latency saving per unit of
    cost (``efficiency``; the cost is output KL or weight mass lost), capped at ``max_ratio``; ``predicted`` is the
    latency ratio the sweep's savings add up to (``g(r) = 1 - (1 - r)^2`` scales a saving measured at
    ``probe_ratio`` to ratio ``r``).

    Example (recorded sweep of the 64x64 Lite0, OpenVINO INT8 bs32):
        >>> plan = Allocation({"blocks.1": 0.14, "blocks.5": 0.004}, {"blocks.1": 0.034, "blocks.5": 0.26}, 0.5, 0.8)
        >>> plan.for_goal(0.9)          # blocks.1 buys 35x more time per unit of weight mass: pruned first
        {'blocks.1': 0.318..., 'blocks.5': 0.001...}
    """

    def __init__(self, saving: dict[str, float], cost: dict[str, float], probe_ratio: float, max_ratio: float):
        self.saving, self.probe_ratio, self.max_ratio = dict(saving), probe_ratio, max_ratio
        # a unit whose saving was within noise of zero still ranks by its cost, behind every unit that paid
        floor = 0.01 * max(max(saving.values()), 1e-9)
        self.efficiency = {n: max(saving[n], floor) / max(cost[n], 1e-6) for n in saving}
        self.top = max(self.efficiency.values())
        self.s_max = max_ratio * self.top / min(self.efficiency.values())  # every unit at max_ratio
        self.p_min = self.predicted(self.at_scale(self.s_max))

    def at_scale(self, scale: float) -> dict[str, float]:
        return {n: min(self.max_ratio, scale * e / self.top) for n, e in self.efficiency.items()}

    @staticmethod
    def _g(r: float) -> float:  # a block pruned on both sides keeps (1 - r)^2 of its multiply-adds
        return 1.0 - (1.0 - r) ** 2

    def predicted(self, ratios: dict[str, float]) -> float:
        g0 = self._g(self.probe_ratio)
        return max(0.0, 1.0 - sum(max(self.saving[n], 0.0) * self._g(r) / g0 for n, r in ratios.items()))

    def for_goal(self, goal: float) -> dict[str, float]:
        """The allocation whose predicted ratio is ``goal`` (all units at ``max_ratio`` when it cannot be met)."""
        lo, hi = 0.0, self.s_max
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.predicted(self.at_scale(mid)) > goal else (lo, mid)
        return self.at_scale(hi)


# A target counts as met up to this fraction above it (the search stops there; a replayed plan is judged so too).
TOLERANCE = 0.05


def timed_plan(model, pruned, target: LatencyTarget, probe: LatencyProbe, ratios: dict[str, float]) -> dict:
    """Latency facts of ``pruned`` (``model`` pruned by a given plan, ``prune.plan``): one pair timed on ``probe``,
    no sweep and no prediction; the same keys as ``prune_to_latency``'s facts."""
    got = probe.ratio(probe.build(pruned), probe.build(model))
    target_ratio = min(target.ratio(got["base_ms"]), 0.99)
    return {"target": str(target), "target_ratio": round(target_ratio, 4), "runtime": probe.runtime,
            "batch_size": probe.batch_size, "clock": probe.clock, "unpruned_ms": round(got["base_ms"], 4),
            "predicted_ratio": None, "measured_ratio": round(got["ratio"], 4),
            "met": got["ratio"] <= target_ratio * (1 + TOLERANCE), "cost": "plan", "unit_ratios": dict(ratios),
            "trials": [], "sweep": []}


def prune_to_latency(model, input_size: tuple[int, int, int], target: LatencyTarget, probe: LatencyProbe, *,
                     prune_fn: Callable, probe_ratio: float = 0.5, max_ratio: float = 0.8,
                     tolerance: float = TOLERANCE, max_trials: int = 4, cost_fn: Callable | None = None,
                     log: Callable[[str], None] = lambda s: None):
    """Prune a copy of ``model`` to ``target`` latency on ``probe``'s runtime; returns (pruned copy, facts).

    ``prune_fn(model, ratios: {unit module: ratio})`` prunes a model in place (the stage's Torch-Pruning call, so
    rounding, ignored layers and attention handling are the stage's). ``cost_fn(pruned copy)`` is what pruning one
    unit at ``probe_ratio`` cost (``OutputSensitivity``); None = the fraction of L2 weight mass removed.
    """
    from .stages.prune import classifier_modules

    units = prunable_units(model, classifier_modules(model))
    if not units:
        raise RecipeError("the model has no prunable blocks for a latency target",
                          fix="use prune.macs_reduction or prune.ratio")
    mass0 = weight_mass(model)
    names = [n for n, _ in units]

    # 1. sweep: each unit pruned alone, each timed in a pair with the unpruned model (a ratio from one run;
    # timing ten compiled models in one rotation let their thread pools disturb each other: medians 0.6-1.5x off)
    base_fn = probe.build(model)
    first = probe.time({"unpruned": base_fn})["unpruned"]
    if not 0 < target.ratio(first) < 1:
        raise RecipeError(f"latency target {target} is {target.ratio(first):.2f}x of the unpruned {first:.2f} ms on "
                          f"{probe.describe()}: nothing to prune", fix="set a target below the unpruned latency")

    def timed(ratios: dict[str, float]) -> tuple:
        """A copy of ``model`` pruned by {unit name: ratio}, and its latency beside the unpruned model's
        (``LatencyProbe.ratio``: the ratio is paired by round, the medians are reported)."""
        trial = copy.deepcopy(model)
        modules = dict(trial.named_modules())
        prune_fn(trial, {modules[n]: r for n, r in ratios.items() if r > 0})
        return trial, probe.ratio(probe.build(trial), base_fn)

    cost, saving, sweep = {}, {}, []
    for name in names:
        trial, got = timed({name: probe_ratio})
        cost[name] = max(1e-6, cost_fn(trial) if cost_fn else 1.0 - weight_mass(trial) / mass0)
        saving[name] = 1.0 - got["ratio"]
        sweep.append({"unit": name, "saving": round(saving[name], 4), "cost": round(cost[name], 4),
                      "unpruned_ms": round(got["base_ms"], 4), "pruned_ms": round(got["ms"], 4)})
    base = float(np.median([s["unpruned_ms"] for s in sweep]))
    target_ratio = min(target.ratio(base), 0.99)
    log(f"latency sweep on {probe.describe()}: unpruned {base:.3f} ms; "
        + ", ".join(f"{s['unit']} -{s['saving']:.0%}" for s in sorted(sweep, key=lambda s: -s['saving'])[:4]))
    if max(saving.values()) <= 0:
        raise RecipeError(f"pruning no block made the model faster on {probe.describe()} (unpruned {base:.2f} ms)",
                          fix="measure at a larger batch size (prune.latency_batch_size), or use macs_reduction")
    plan = Allocation(saving, cost, probe_ratio, max_ratio)

    # 2-3. allocate by the prediction, measure, then correct the *predicted* ratio asked for by a secant through
    # what was measured (predicted 1.0 is the unpruned model, measured 1.0): the prediction is only a first guess
    trials, best, points, goal = [], None, [(1.0, 1.0)], max(target_ratio, plan.p_min)

    def trial_at(alloc: dict[str, float]) -> tuple:
        trial, got = timed(alloc)
        measured = got["ratio"]
        rec = {"predicted_ratio": round(plan.predicted(alloc), 4), "measured_ratio": round(measured, 4),
               "unpruned_ms": round(got["base_ms"], 4), "pruned_ms": round(got["ms"], 4),
               "ratios": {n: round(r, 3) for n, r in alloc.items() if round(r, 3) > 0},
               "at_max_ratio": all(r >= max_ratio - 1e-9 for r in alloc.values())}
        trials.append(rec)
        log(f"latency trial {len(trials)}: predicted {rec['predicted_ratio']:.2f}x, measured {measured:.2f}x "
            f"(target {target_ratio:.2f}x)")
        return trial, rec

    for _ in range(max_trials):
        trial, rec = trial_at(plan.for_goal(goal))
        measured = rec["measured_ratio"]
        if best is None or abs(measured - target_ratio) < abs(best[1]["measured_ratio"] - target_ratio):
            best = (trial, rec)
        if abs(measured - target_ratio) <= tolerance * target_ratio:
            break
        points.append((goal, measured))
        (g0, m0), (g1, m1) = sorted(points, key=lambda p: abs(p[1] - target_ratio))[:2]
        nxt = g1 + (target_ratio - m1) * (g1 - g0) / (m1 - m0) if m1 != m0 else goal
        if (measured > target_ratio) != (nxt < goal):  # noise made the secant point the wrong way: bisect instead
            nxt = (goal + plan.p_min) / 2 if measured > target_ratio else (goal + 1.0) / 2
        nxt = min(max(nxt, plan.p_min), 0.99)
        if nxt == goal:  # pinned at the most pruning allowed (or the least): stop
            break
        goal = nxt
    pruned, rec = best
    if rec["measured_ratio"] > target_ratio * (1 + 2 * tolerance):
        # still well above the target: is it within reach at all? Every block at max_ratio tells (measured once)
        full = [t for t in trials if t["at_max_ratio"]]
        if not full:
            last = trial_at({n: max_ratio for n in names})
            full = [last[1]]
            if abs(last[1]["measured_ratio"] - target_ratio) < abs(rec["measured_ratio"] - target_ratio):
                pruned, rec = last
        reach = min(t["measured_ratio"] for t in full)
        if reach > target_ratio * (1 + 2 * tolerance):
            # pruning further cannot get there (per-call overhead, or blocks that buy nothing): stop before hours of
            # fine-tuning a model that is slower than asked and much less accurate
            raise RecipeError(
                f"latency target {target} is out of reach on {probe.describe()}: every block pruned as far as "
                f"allowed (max_ratio {max_ratio}) measured {reach:.2f}x of the unpruned {base:.3f} ms",
                fix=f"ask for {min(0.95, reach * 1.1):.2f}x or more, measure at a larger batch "
                    "(prune.latency_batch_size), or use prune.macs_reduction")
    met = rec["measured_ratio"] <= target_ratio * (1 + tolerance)
    return pruned, {"target": str(target), "target_ratio": round(target_ratio, 4), "runtime": probe.runtime,
                   "batch_size": probe.batch_size, "clock": probe.clock, "unpruned_ms": round(base, 4),
                   "predicted_ratio": rec["predicted_ratio"], "measured_ratio": rec["measured_ratio"],
                   "met": met, "probe_ratio": probe_ratio, "cost": "output" if cost_fn else "weight_mass",
                   "sweep": sweep, "trials": trials,
                   "unit_ratios": rec["ratios"]}
