"""Latency measurement: warm-up, many runs, percentiles; variants interleaved so noise hits all alike.

Example:
    >>> stats = measure_interleaved({"a": f, "b": g}, x, warmup=3, runs=30)
    >>> stats["a"].p50
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass
class LatencyStats:
    batch_size: int
    runs: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / (self.p50 / 1000.0) if self.p50 > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput": round(self.throughput, 2)}

    @classmethod
    def from_samples(cls, samples_ms: list[float], batch_size: int) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(batch_size, len(a), round(float(p50), 4), round(float(p90), 4), round(float(p99), 4),
                   round(float(a.mean()), 4), round(float(a.min()), 4))


def _once(fn: Callable, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1000.0


def measure_interleaved(fns: dict[str, Callable], x: np.ndarray, warmup: int = 5, runs: int = 30,
                        time_budget_s: float | None = None) -> dict[str, LatencyStats]:
    """Time several variants on the same input, alternating them run by run.

    Alternating (rather than timing A fully, then B) means a noisy neighbour or a frequency change
    affects every variant equally, so their ratios are trustworthy on a shared 2-core machine.
    ``time_budget_s`` stops early (after at least 3 rounds) so large batches cannot run for minutes.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(runs):
        order = list(fns.items())
        if i % 2:  # alternate the order too: whoever runs first after the other gets no cache advantage
            order.reverse()
        for name, fn in order:
            samples[name].append(_once(fn, x))
        if time_budget_s and i >= 2 and time.perf_counter() - start > time_budget_s:
            break
    return {k: LatencyStats.from_samples(v, len(x)) for k, v in samples.items()}


def measure_in_blocks(fns: dict[str, Callable], x: np.ndarray, *, rounds: int = 6, block_runs: int = 5,
                      warmup: int = 1, time_budget_s: float | None = None) -> dict[str, LatencyStats]:
    """Time several *runtimes* on the same input in short blocks that alternate round by round.

    Why blocks and not run-by-run alternation: each runtime keeps its own thread pool, which spins for a while
    after a call; on 2 cores the next runtime pays for that spinning (measured: ORT INT8 at batch 32 took
    8.2 ms right after PyTorch calls vs 2.9 ms in blocks). The untimed warm-up run at the start of every block
    absorbs the switch; alternating blocks (order reversed every round) still spreads drifting load over all.
    ``time_budget_s`` stops after the round that passes it (at least 2 rounds).

    Example:
        >>> stats = measure_in_blocks({"fp32": a.run, "int8": b.run}, x, rounds=6)
    """
    samples: dict[str, list[float]] = {n: [] for n in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            for _ in range(warmup):
                fns[name](x)
            samples[name] += [_once(fns[name], x) for _ in range(block_runs)]
        if time_budget_s and r >= 1 and time.perf_counter() - start > time_budget_s:
            break
    return {n: LatencyStats.from_samples(v, len(x)) for n, v in samples.items()}
