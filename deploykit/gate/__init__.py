"""The CI latency-regression gate: is the artifact's deployed model slower than its baseline, beyond noise?

One module per concern:
  * ``stats``: the decision on per-round time ratios (bootstrap CI, exit codes 0/1/2), no clocks involved.
  * ``measure``: the measurements: the reference workload and the alternating candidate/reference rounds.
  * ``baseline``: baseline files (make, load and check) and ``run_gate``, what `deploykit bench --baseline` runs.

Example:
    >>> make_baseline("a.deploykit", "bench/baselines/a.json", [1])
    >>> run_gate("a.deploykit", load_baseline("bench/baselines/a.json"), 0.10, base_dir="bench/baselines")["verdict"]
    'pass'
"""

from __future__ import annotations

from .baseline import BASELINE_SCHEMA, GATE_SCHEMA, load_baseline, make_baseline, run_gate
from .measure import (AUTO_CLOCK_MS, CLOCKS, ReferenceWorkload, auto_clock, measure_gate, measure_ratios,
                      model_reference, synthetic_reference_model, with_planted_slowdown)
from .stats import (MIN_ROUNDS, NOISY, OK, REGRESSION, VERDICTS, Decision, Estimate, GateError,
                    bootstrap_slowdown_ci, combine, decide, decide_estimate, estimate, parse_slowdown)

__all__ = [
    "BASELINE_SCHEMA", "GATE_SCHEMA", "load_baseline", "make_baseline", "run_gate",
    "AUTO_CLOCK_MS", "CLOCKS", "ReferenceWorkload", "auto_clock", "measure_gate", "measure_ratios", "model_reference",
    "synthetic_reference_model", "with_planted_slowdown",
    "MIN_ROUNDS", "NOISY", "OK", "REGRESSION", "VERDICTS", "Decision", "Estimate", "GateError",
    "bootstrap_slowdown_ci", "combine", "decide", "decide_estimate", "estimate", "parse_slowdown",
]
