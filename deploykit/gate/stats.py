"""The latency-regression gate's statistics: is a candidate slower than its baseline, beyond noise?

Absolute times on a shared CI machine drift by tens of percent, so the gate never compares them.
Each measurement round times the candidate model and a fixed reference workload back to back in
one process; the per-round ratio candidate/reference cancels machine speed and slow load changes.
The slowdown is the candidate's median ratio over the baseline's stored median ratio, minus 1,
with a seeded 95% confidence interval that covers what separates two runs: a hierarchical bootstrap over blocks
of consecutive rounds (drift inside a run), widened by the measured spread between runs (``RUN_SD``).

Decision (P = the tolerated slowdown, e.g. 0.10):
  * CI entirely above P        -> 1 regression (clear)
  * CI entirely at or below P  -> 0 no regression (clear)
  * CI straddles P, width > P  -> 2 too noisy to decide (re-run on a quieter machine, or longer)
  * CI straddles P, width <= P -> the point estimate decides (1 if above P, else 0)

Statistics with numpy only (no scipy): the bootstrap is vectorised so a decision costs ~0.1 s.

Example:
    >>> d = decide(candidate_ratios, baseline_ratios, max_slowdown=0.10)
    >>> d.exit_code, d.slowdown, d.ci
    (0, 0.004, (-0.011, 0.019))
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from statistics import median
from typing import Sequence

from ..errors import DeployKitError

OK, REGRESSION, NOISY = 0, 1, 2
VERDICTS = {OK: "no regression", REGRESSION: "REGRESSION", NOISY: "too noisy to decide"}
MIN_ROUNDS = 10
# Between-run spread of one gate run's log median ratio (see widen_for_runs): 0.46% measured by bench/gate_proof.py
# over 40 one-second runs of the reference INT8 model at batch 1, one core kept busy by an outside process (Intel
# Xeon, bench/results/gate_proof_bs1_busy.json), rounded up.
RUN_SD = 0.005


class GateError(DeployKitError):
    """The gate cannot run: bad threshold, empty or malformed baseline."""


@dataclass
class Decision:
    """The gate's verdict with the evidence it rests on (printed and stored in gate.json)."""

    exit_code: int
    verdict: str
    reason: str
    slowdown: float            # point estimate: median ratio (candidate) / median ratio (baseline) - 1
    ci: tuple[float, float]    # 95% bootstrap CI of the slowdown
    max_slowdown: float
    candidate_median_ratio: float
    baseline_median_ratio: float
    candidate_rounds: int
    baseline_rounds: int
    resamples: int
    confidence: float = 0.95
    key: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d

    def summary(self) -> str:
        """One line: verdict, estimate, interval, threshold and sample sizes."""
        lo, hi = self.ci
        tag = f"[{self.key}] " if self.key else ""
        return (f"{tag}{self.verdict}: slowdown {self.slowdown:+.1%} (95% CI {lo:+.1%} .. {hi:+.1%}, "
                f"limit {self.max_slowdown:+.1%}); median ratio candidate/reference {self.candidate_median_ratio:.4f} "
                f"vs baseline {self.baseline_median_ratio:.4f}; {self.candidate_rounds} vs {self.baseline_rounds} rounds. "
                f"{self.reason}")


def parse_slowdown(text: str | float) -> float:
    """'10%' / '0.1' / 10 -> 0.10 (numbers above 1 are read as percent).

    Example:
        >>> parse_slowdown("10%")
        0.1
    """
    if isinstance(text, (int, float)):
        value, percent = float(text), False
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise GateError(f"--max-slowdown {text!r} is not a number or percentage", fix="write it like 10% or 0.1")
        value, percent = float(m.group(1)), bool(m.group(2))
    if percent or value > 1:
        value /= 100.0
    return _check_limit(value, text)


def _check_limit(value: float, text) -> float:
    if not 0 < value < 1:
        raise GateError(f"--max-slowdown {text!r} must be between 0% and 100%", fix="e.g. --max-slowdown 10%")
    return value


def _block_indices(rng, n: int, blocks: int, k: int):
    """``k`` hierarchical resamples of ``n`` rounds: ``blocks`` contiguous blocks drawn with replacement, then rounds
    drawn with replacement inside each drawn block (rounds past the last whole block join it)."""
    import numpy as np

    blocks = max(1, min(blocks, n))
    size = n // blocks
    starts = np.arange(blocks) * size
    sizes = np.full(blocks, size)
    sizes[-1] = n - starts[-1]
    chosen = rng.integers(0, blocks, (k, blocks))
    offs = (rng.random((k, blocks, size)) * sizes[chosen][:, :, None]).astype(np.int64)
    return (starts[chosen][:, :, None] + offs).reshape(k, blocks * size)


def bootstrap_slowdown_ci(candidate: Sequence[float], baseline: Sequence[float], resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0, blocks: int | None = 8) -> tuple[float, float]:
    """Hierarchical bootstrap CI of median(candidate)/median(baseline) - 1, resampling both runs independently.

    Rounds are not independent: a run drifts (a neighbour's job starts, the CPU clocks down), so consecutive rounds
    share a level. Resampling single rounds treats 400 drifting rounds as 400 independent ones and gave intervals
    that excluded 0 in 5 of 10 A/A runs; resampling ``blocks`` contiguous blocks first, then rounds inside them,
    carries the drift into the interval. ``blocks=None`` (or 1 round per block) is the plain round bootstrap.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    cand, base = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    stats = np.empty(resamples)
    step = max(1, 2_000_000 // max(len(cand), len(base)))  # chunks keep the index matrices ~16 MB
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        if blocks:
            c = np.median(cand[_block_indices(rng, len(cand), blocks, k)], axis=1)
            b = np.median(base[_block_indices(rng, len(base), blocks, k)], axis=1)
        else:
            c = np.median(cand[rng.integers(0, len(cand), (k, len(cand)))], axis=1)
            b = np.median(base[rng.integers(0, len(base), (k, len(base)))], axis=1)
        stats[start:start + k] = c / b - 1.0
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def widen_for_runs(slowdown: float, ci: tuple[float, float], run_sd: float, confidence: float = 0.95
                   ) -> tuple[float, float]:
    """Add the between-run spread to a within-run interval.

    Two runs of the same model minutes apart differ by more than their rounds say (the machine's state persists
    for minutes); ``run_sd`` is that spread, the standard deviation of one run's log median ratio, measured by
    ``bench/gate_proof.py`` (A/A runs against other trials' baselines). Candidate and baseline each carry it, so
    the difference carries sqrt(2) of it, added to each side of the interval in quadrature.
    """
    from statistics import NormalDist

    if run_sd <= 0:
        return ci
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    extra = z * run_sd * 2 ** 0.5 * (1 + slowdown)  # on the ratio scale at the estimate
    lo, hi = ci
    return (slowdown - ((slowdown - lo) ** 2 + extra ** 2) ** 0.5, slowdown + ((hi - slowdown) ** 2 + extra ** 2) ** 0.5)


@dataclass
class Estimate:
    """The measured slowdown and its confidence interval, independent of any threshold."""

    slowdown: float
    ci: tuple[float, float]
    candidate_median_ratio: float
    baseline_median_ratio: float
    candidate_rounds: int
    baseline_rounds: int
    resamples: int
    confidence: float


def estimate(candidate: Sequence[float], baseline: Sequence[float], *, resamples: int = 2000,
             confidence: float = 0.95, seed: int = 0, blocks: int | None = 8, run_sd: float = RUN_SD) -> Estimate:
    """Slowdown (median ratio candidate / median ratio baseline - 1) with its CI: a hierarchical bootstrap over
    blocks of rounds, widened by the between-run spread ``run_sd`` (0 = within-run noise only)."""
    for name, xs in (("candidate", candidate), ("baseline", baseline)):
        if len(xs) < MIN_ROUNDS:
            raise GateError(f"the {name} has {len(xs)} timing rounds; the gate needs at least {MIN_ROUNDS}",
                            fix="measure longer (--gate-seconds) or re-create the baseline with --update-baseline")
        if any(not (x > 0) for x in xs):
            raise GateError(f"the {name} holds non-positive or NaN ratios", fix="re-create it with --update-baseline")
    m_c, m_b = median(candidate), median(baseline)
    ci = bootstrap_slowdown_ci(candidate, baseline, resamples, confidence, seed, blocks=blocks)
    ci = widen_for_runs(m_c / m_b - 1.0, ci, run_sd, confidence)
    return Estimate(m_c / m_b - 1.0, ci, m_c, m_b, len(candidate), len(baseline), resamples, confidence)


def decide_estimate(est: Estimate, max_slowdown: float, key: str = "") -> Decision:
    """Apply the module docstring's rule to an Estimate (the CI does not depend on the limit)."""
    lo, hi = est.ci
    width = hi - lo
    p = max_slowdown
    if lo > p:
        code, reason = REGRESSION, f"The whole CI lies above the {p:.0%} limit."
    elif hi <= p:
        code, reason = OK, f"The whole CI lies at or below the {p:.0%} limit."
    elif width > p:
        code, reason = NOISY, (f"The CI straddles the limit and is {width:.1%} wide (> {p:.0%}): the timings are too "
                               "noisy to tell. Re-run on a quieter machine or measure longer.")
    else:
        code = REGRESSION if est.slowdown > p else OK
        reason = f"The CI straddles the limit but is narrow ({width:.1%} <= {p:.0%}), so the point estimate decides."
    return Decision(exit_code=code, verdict=VERDICTS[code], reason=reason, slowdown=est.slowdown, ci=est.ci,
                    max_slowdown=p, candidate_median_ratio=est.candidate_median_ratio,
                    baseline_median_ratio=est.baseline_median_ratio, candidate_rounds=est.candidate_rounds,
                    baseline_rounds=est.baseline_rounds, resamples=est.resamples, confidence=est.confidence, key=key)


def decide(candidate: Sequence[float], baseline: Sequence[float], max_slowdown: float, *, resamples: int = 2000,
           confidence: float = 0.95, seed: int = 0, key: str = "", run_sd: float = RUN_SD) -> Decision:
    """Compare per-round candidate/reference ratios against the baseline's; see the module docstring.

    Args:
        candidate, baseline: per-round time ratios (candidate model / reference workload), > 0.
        max_slowdown: tolerated slowdown as a fraction (0.10 = 10%).
    Returns:
        A Decision whose ``exit_code`` is 0 (no regression), 1 (regression) or 2 (too noisy).
    """
    est = estimate(candidate, baseline, resamples=resamples, confidence=confidence, seed=seed, run_sd=run_sd)
    return decide_estimate(est, max_slowdown, key)


def combine(decisions: Sequence[Decision]) -> int:
    """Overall exit code over several gated configurations: any regression wins, then any undecided."""
    codes = {d.exit_code for d in decisions}
    if REGRESSION in codes:
        return REGRESSION
    if NOISY in codes or not decisions:
        return NOISY
    return OK
