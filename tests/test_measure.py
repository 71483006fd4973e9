"""The one measurement harness (deploykit.measure): real durations, early stopping, intervals, and that it is the
only place in the package that times anything in a loop."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np

from deploykit.measure import MIN_ORDER_STAT, NOISE, median_interval, time_batch_sizes, time_variants

PACKAGE = Path(__file__).resolve().parents[1] / "deploykit"


def sleeper(ms: float):
    return lambda x: time.sleep(ms / 1000)


def test_median_interval_is_the_binomial_order_statistic_interval():
    # n=100: P(Binomial(100, 1/2) <= 39) = 0.018 < 0.025 <= P(<= 40) = 0.028, so the 95% interval is X(41)..X(60),
    # i.e. 0-based indices 40 and 59 of the sorted samples
    assert median_interval(np.arange(100.0)) == (40.0, 59.0)
    assert median_interval(np.arange(100.0)[::-1]) == (40.0, 59.0)  # order of arrival does not matter
    # too few samples for order statistics: the machine's noise factor around the observed range
    assert median_interval([2.0, 3.0]) == (2.0 / NOISE, 3.0 * NOISE)
    lo, hi = median_interval(np.arange(float(MIN_ORDER_STAT)))
    assert 0.0 <= lo <= hi <= MIN_ORDER_STAT - 1


def test_without_early_stopping_every_variant_gets_every_round():
    run = time_variants({"fast": sleeper(2), "slow": sleeper(8)}, np.zeros(1), max_rounds=3, block_runs=3,
                        eliminate=False)
    fast, slow = run.records["fast"], run.records["slow"]
    assert fast.runs == slow.runs == 9 and fast.blocks == slow.blocks == 3 and run.rounds == 3
    assert 2.0 <= fast.p50 < 6.0 and 8.0 <= slow.p50 < 14.0  # sleep never returns early; load may add a little
    assert fast.cpu_p50 < 1.0  # sleeping costs no CPU: the CPU clock is recorded from the same runs
    lo, hi = fast.interval
    assert lo <= fast.p50 <= hi


def test_a_variant_that_cannot_win_stops_being_timed():
    run = time_variants({"fast": sleeper(2), "slow": sleeper(30)}, np.zeros(1), max_rounds=6, block_runs=5)
    assert run.stopped.startswith("decided after round 1: only fast")
    assert run.records["slow"].stopped.startswith("eliminated after round 1")
    assert run.rounds == 1 and run.records["slow"].runs <= 5  # 30 ms calls: 0.3-s blocks hold at most 5
    # a call so slow that a block holds one run is timed twice before it can be ruled out
    slow = time_variants({"fast": sleeper(2), "slow": sleeper(320)}, np.zeros(1), max_rounds=6)
    assert slow.stopped.startswith("decided after round 2") and slow.records["slow"].runs == 2
    assert run.records["slow"].p50 >= 30.0


def test_equal_variants_stop_as_a_tie_and_budget_stops_the_rest():
    tie = time_variants({"a": sleeper(5), "b": sleeper(5)}, np.zeros(1), max_rounds=20, decide_within=0.5)
    assert tie.stopped.startswith("tie after round 2") and tie.rounds == 2
    budget = time_variants({"a": sleeper(5), "b": sleeper(5)}, np.zeros(1), max_rounds=50, eliminate=False,
                           time_budget_s=0.05)
    assert budget.stopped.startswith("time budget") and budget.rounds == 2  # at least min_rounds, then stop


def test_slow_calls_get_one_run_per_block():
    run = time_variants({"slow": sleeper(200), "mid": sleeper(120)}, np.zeros(1), max_rounds=2, eliminate=False)
    # a 0.3-s block holds one 200-ms run and two 120-ms runs (what fits, at least one)
    assert (run.records["slow"].runs, run.records["mid"].runs) == (2, 4)
    runs = time_batch_sizes({"a": lambda x: time.sleep(0.001 * len(x))}, np.zeros((1, 3)), [1, 4], max_rounds=2,
                            eliminate=False)
    assert runs[4].records["a"].p50 > runs[1].records["a"].p50 and runs[4].batch_size == 4


CLOCK_NAMES = {"perf_counter", "process_time", "monotonic", "time", "perf_counter_ns", "process_time_ns"}


def _clock_calls_in_loops(tree: ast.AST) -> list[int]:
    lines = []
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While, ast.AsyncFor, ast.comprehension)):
            continue
        for node in ast.walk(loop if not isinstance(loop, ast.comprehension) else loop.iter):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCK_NAMES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
                lines.append(node.lineno)
    return lines


def test_the_harness_is_the_only_timing_loop_in_the_package():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "measure.py" and path.parent == PACKAGE:
            continue
        lines = _clock_calls_in_loops(ast.parse(path.read_text()))
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert offenders == {}, f"time.* called inside a loop outside deploykit/measure.py: {offenders}"
    # and the detector does detect one
    assert _clock_calls_in_loops(ast.parse("import time\nfor i in range(3):\n    t = time.perf_counter()\n")) == [3]


class TwoSpeedMachine:
    """A simulated clock on a machine that runs every call ``slow`` times slower until it switches to full speed,
    as the shared 2-core Xeon did (its AMX INT8 convolutions flipped between ~13 and ~6 ms every few seconds):
    each call advances the clock by its cost, scaled by the speed at the moment it starts. The switch comes after
    ``switch_after`` calls of the model named ``switch_on``."""

    def __init__(self, switch_on: str, switch_after: int, slow: float = 2.3):
        self.now_ms, self.slow, self.calls = 0.0, slow, {}
        self.switch_on, self.switch_after = switch_on, switch_after

    def clock(self) -> float:
        return self.now_ms / 1000.0

    def model(self, name: str, cost_ms: float):
        def run(x):
            slow = self.calls.get(self.switch_on, 0) < self.switch_after
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now_ms += cost_ms * (self.slow if slow else 1.0)
        return run


def test_ratios_pair_blocks_of_the_same_round_so_a_machine_changing_speed_cancels(monkeypatch):
    import deploykit.measure as measure

    # 39 rounds, each variant's block = 1 untimed + 5 timed calls, after 1 warm-up call. The machine speeds up
    # right after the peer's 20th block, which is round 19's first (odd rounds run in reverse order): the peer
    # ran 20 of its 39 blocks slow, the pruned model 19.
    m = TwoSpeedMachine(switch_on="peer", switch_after=1 + 20 * 6)
    monkeypatch.setitem(measure.CLOCKS, "wall", m.clock)
    run = time_variants({"pruned": m.model("pruned", 1.0), "peer": m.model("peer", 2.5)}, np.zeros(1),
                        max_rounds=39, block_runs=5, warmup=1, eliminate=False)
    # the medians of all runs: the peer's lands on a slow run, the pruned model's on a fast one (off by 2.3x)
    assert run.records["pruned"].p50 / run.records["peer"].p50 == 1.0 / (2.5 * 2.3)
    # a round whose two blocks ran at one speed gives exactly 1.0 / 2.5; all but round 19 did
    ratio = run.ratio("pruned", "peer")
    assert (ratio.value, ratio.rounds) == (0.4, 39) and ratio.interval == (0.4, 0.4)
    assert run.ratio("peer", "pruned").value == 2.5  # the speedup, paired the same way


def test_ratio_pairs_only_rounds_both_were_timed_in():
    run = time_variants({"fast": sleeper(1), "mid": sleeper(1.5), "slow": sleeper(30)}, np.zeros(1), max_rounds=6,
                        block_runs=5, decide_within=0.0)
    assert run.records["slow"].stopped.startswith("eliminated after round 1")
    r = run.ratio("slow", "fast")
    assert r.rounds == 1 < len(run.records["fast"].rounds_ms)
    assert r.value > 10  # 30 ms over ~1 ms: sleep never returns early, load may add a little to either


def test_the_report_pairs_speedups_when_one_run_timed_both():
    """compress's report (deploykit.compare.latency_ratio): paired by round within one timing run; two variants
    timed in different runs (one by select_runtime, one by the report) can only be compared by their medians."""
    from deploykit.compare import latency_ratio
    from deploykit.measure import Timing, TimingRun

    def rec(name, rounds):  # rounds: block medians, one per round; the runs are the block medians themselves
        return Timing(name, 1, wall_ms=list(rounds), cpu_ms=list(rounds),
                      rounds_ms={i: (ms, ms) for i, ms in enumerate(rounds)})

    # a machine at full speed in rounds 0-1, 2.3x slower in rounds 2-4: the original is 2x the compressed throughout
    one = TimingRun(1, {"original": rec("original", [2.0, 2.0, 4.6, 4.6, 4.6]),
                        "compressed": rec("compressed", [1.0, 1.0, 2.3, 2.3, 2.3])}, 5, 1.0, "")
    other = TimingRun(1, {"onnx_fp32": rec("onnx_fp32", [3.0, 3.0, 3.0])}, 3, 1.0, "")
    runs = {1: {"original": (one, "original"), "compressed": (one, "compressed"), "onnx_fp32": (other, "onnx_fp32")}}
    assert latency_ratio(runs, 1, "original", "compressed") == 2.0
    assert latency_ratio(runs, 1, "onnx_fp32", "compressed") == 3.0 / 2.3  # medians: 3.0 over 2.3
