"""The one measurement harness: every latency deploykit reports is timed here, every accuracy comes from logits
gathered here.

``time_variants`` times several runtimes on the same input in alternating blocks (warm-up first, one untimed run at
the start of each short block, order reversed every round) and stops early: a variant whose interval shows it
cannot be the fastest stops being timed (successive elimination), and the whole run stops once one variant is
left, the remaining ones are within ``decide_within`` of each other, or the time budget is spent. Each variant
gets one ``Timing`` record (p50/p90/p99, throughput, CPU time, interquartile range, an interval on the median,
how many runs and why timing stopped); select_runtime, the compress report, ``deploykit bench`` and the accuracy
guard all show these records, so a number has one value wherever it appears.

``TimingRun.ratio(a, b)`` is how every speed claim compares two variants: the median over rounds of the ratio of
their block medians in the same round (``Ratio``), so a machine that changes speed between rounds cancels.
``paired_ratios`` is the CI gate's design (candidate and reference called in ABBA order, a ratio per round);
``logits_for`` runs several backends over the same preprocessed batches.

Example:
    >>> run = time_variants({"fp32": a.run, "int8": b.run}, x, time_budget_s=10)
    >>> run.records["int8"].p50, run.stopped
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np



class _CudaInstant:
    """A CUDA event recorded on the current stream; ``later - earlier`` waits for ``later`` and gives the seconds
    the GPU saw between the two (``torch.cuda.Event.elapsed_time``), so it reads like the other clocks."""

    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def __sub__(self, earlier: "_CudaInstant") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1000.0


def cuda_now() -> _CudaInstant:
    """The 'cuda' clock: record a timing event on the current CUDA stream (needs a GPU; used only on CUDA).

    A call bracketed by two events is timed from when the GPU reaches the first (at once, on an idle stream) to
    when it finishes the call's last queued work: the host-side staging in between counts, launch jitter of the
    host clock does not. Not yet run on a GPU (docs/gpu.md).
    """
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return _CudaInstant(event)


# The clocks a timing can use. 'cpu' = process CPU time (a neighbour preempting us does not advance it; it counts
# spinning pool threads), 'wall' = elapsed time (what a user waits), 'cuda' = CUDA events on the current stream
# (GPU runtimes only: ``cuda_now``).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter, "cuda": cuda_now}

# With fewer than this many samples the order-statistic interval of the median is the whole range, which says
# nothing; such a median is given the range [min / NOISE, max * NOISE] instead: on these shared machines
# absolute times drift up to 1.5x within half an hour, so a single run is trusted to within that factor only.
MIN_ORDER_STAT = 6
NOISE = 1.5


@contextmanager
def stopwatch() -> Iterator[dict]:
    """``with stopwatch() as sw: ...`` then ``sw["seconds"]``: wall time of a step (stages, model loading)."""
    sw = {"seconds": 0.0}
    t0 = time.perf_counter()
    try:
        yield sw
    finally:
        sw["seconds"] = time.perf_counter() - t0


def median_interval(samples: list[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval on the median: order statistics ``X(r) <= median <= X(n-r+1)`` with r from the
    binomial(n, 1/2) quantile (no normality assumption; latency is skewed). Few samples: see ``NOISE``."""
    a = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(a)
    if n == 0:
        return float("nan"), float("nan")
    if n < MIN_ORDER_STAT:
        return float(a[0] / NOISE), float(a[-1] * NOISE)
    from scipy.stats import binom

    r = int(binom.ppf((1 - confidence) / 2, n, 0.5))  # 0-based index of X(r+1); symmetric on the other side
    r = max(0, min(r, (n - 1) // 2))
    return float(a[r]), float(a[n - 1 - r])


@dataclass
class Timing:
    """One variant at one batch size: every timed run (wall and CPU ms) and the statistics the reports show."""

    name: str
    batch_size: int
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    blocks: int = 0
    stopped: str = ""           # why this variant's timing ended
    clock: str = "wall"         # what wall_ms was read from: 'wall' (perf_counter) or 'cuda' (CUDA events)
    # round -> (median wall ms, median CPU ms) of this variant's block in that round: what ``TimingRun.ratio`` pairs
    rounds_ms: dict[int, tuple[float, float]] = field(default_factory=dict)

    def _pct(self, q: float) -> float:
        return round(float(np.percentile(self.wall_ms, q)), 4) if self.wall_ms else float("nan")

    @property
    def runs(self) -> int:
        return len(self.wall_ms)

    @property
    def p50(self) -> float:
        return self._pct(50)

    @property
    def p90(self) -> float:
        return self._pct(90)

    @property
    def p99(self) -> float:
        return self._pct(99)

    @property
    def interval(self) -> tuple[float, float]:
        return median_interval(self.wall_ms)

    @property
    def iqr_ms(self) -> float:
        return round(self._pct(75) - self._pct(25), 4) if self.wall_ms else float("nan")

    @property
    def cpu_p50(self) -> float:
        return round(float(np.median(self.cpu_ms)), 4) if self.cpu_ms else float("nan")

    @property
    def cpu_p90(self) -> float:
        return round(float(np.percentile(self.cpu_ms, 90)), 4) if self.cpu_ms else float("nan")

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / (self.p50 / 1000.0) if self.p50 > 0 else float("inf")

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": round(float(np.mean(self.wall_ms)), 4),
                "min": round(float(np.min(self.wall_ms)), 4), "iqr": self.iqr_ms,
                "p50_interval": [round(lo, 4), round(hi, 4)], "cpu_p50": self.cpu_p50,
                "throughput_ips": round(self.throughput, 1), "runs": self.runs, "blocks": self.blocks,
                "stopped": self.stopped, "clock": self.clock}


@dataclass
class TimingRun:
    """All variants timed together at one batch size."""

    batch_size: int
    records: dict[str, Timing]
    rounds: int
    seconds: float
    stopped: str                # why the whole run ended

    def p50(self) -> dict[str, float]:
        return {n: t.p50 for n, t in self.records.items()}

    def ratio(self, a: str, b: str, clock: str = "wall") -> "Ratio":
        """``a``'s latency over ``b``'s, paired by round (see ``Ratio``); ``clock`` 'cpu' pairs CPU time."""
        ra, rb = self.records[a].rounds_ms, self.records[b].rounds_ms
        i = 1 if clock == "cpu" else 0
        per_round = [ra[k][i] / rb[k][i] for k in sorted(ra.keys() & rb.keys()) if rb[k][i] > 0]
        if not per_round:
            raise ValueError(f"{a!r} and {b!r} were never timed in the same round")
        lo, hi = median_interval(per_round)
        return Ratio(a, b, round(float(np.median(per_round)), 4), (round(lo, 4), round(hi, 4)), len(per_round))


@dataclass(frozen=True)
class Ratio:
    """``a``'s latency / ``b``'s: the median over rounds of the ratio of their block medians in the same round.

    Why not ``p50(a) / p50(b)``: a shared machine switches speed on a scale of seconds, and a median over runs
    from both speeds lands wherever the mix puts it. Measured on a 2-core Xeon whose AMX INT8 convolutions
    flipped between ~6 and ~13 ms every few seconds (a batch-32 ResNet-10-T, OpenVINO + NNCF INT8): after 40
    rounds ``p50(peer) / p50(pruned)`` read 1.47 while the per-round ratio read 2.51, and 200 rounds later both
    read 2.50 (per-round ratios 2.26-2.61, 10th-90th percentile). Two blocks of the same round are a fraction of
    a second apart, so they see the same machine. ``interval`` is the order-statistic interval of the median
    (``median_interval``); ``rounds`` how many rounds timed both.
    """

    a: str
    b: str
    value: float
    interval: tuple[float, float]
    rounds: int


def _timed(fn: Callable, x, clock: str = "wall") -> tuple[float, float]:
    """(elapsed ms on ``clock`` — 'wall' or 'cuda' —, process CPU ms) of one call."""
    now = CLOCKS[clock]
    w0, c0 = now(), time.process_time()
    fn(x)
    return (now() - w0) * 1000.0, (time.process_time() - c0) * 1000.0


def time_variants(fns: dict[str, Callable], x: np.ndarray, *, max_rounds: int = 6, block_runs: int = 5,
                  block_s: float = 0.3, time_budget_s: float | None = None, eliminate: bool = True,
                  decide_within: float = 0.05, min_rounds: int = 2, warmup: int = 1,
                  block_warmup_below_ms: float = 100.0, confidence: float = 0.95,
                  min_runs_to_eliminate: int = 2, clock: str = "wall") -> TimingRun:
    """Time each of ``fns`` on ``x``: warm-up, then rounds of short blocks alternating between variants.

    Why blocks: each runtime keeps its own thread pool, which spins for a while after a call; on 2 cores the next
    runtime pays for that spinning (measured: ORT INT8 bs32 8.2 ms right after PyTorch calls vs 2.9 ms in
    blocks). The untimed run at the start of a block absorbs the switch; it is skipped for calls longer than
    ``block_warmup_below_ms``, where the switch is under 1% of the call. Order reverses every round so drifting
    load is spread over all. A block holds ``block_s`` seconds of runs (at least 1, at most ``block_runs``), so a
    1.6-s batch-32 call is timed once per round and a 2-ms one five times.

    Early stopping (``eliminate``): after each round, a variant whose median interval lies wholly above the best
    variant's interval cannot be the fastest and is not timed again (its record keeps the runs it got, at least
    ``min_runs_to_eliminate``: one 2-s PyTorch call at batch 32 measured 1.93 s in one run and 2.56 s in another).
    The run stops when one variant is left ("decided"), when every remaining variant's interval lies within
    ``decide_within`` of the fastest median ("tie"), after at least ``min_rounds`` rounds once ``time_budget_s``
    is spent ("time budget"), or after ``max_rounds``.

    ``clock`` 'cuda' reads each call's latency from CUDA events (``cuda_now``) instead of the host's wall clock: for
    GPU runtimes, whose calls then need not synchronise (the end event is waited for).
    """
    from .stop import check_stop

    if clock not in ("wall", "cuda"):
        raise ValueError(f"time_variants clock {clock!r}: use 'wall' or 'cuda' (CPU time is always recorded)")
    names = list(fns)
    records = {n: Timing(n, len(x), clock=clock) for n in names}
    est: dict[str, float] = {}
    t_start = time.perf_counter()
    for n in names:  # first calls compile and allocate: never timed
        for _ in range(max(1, warmup)):
            est[n] = _timed(fns[n], x, clock)[0]
    active = list(names)
    rounds, stopped = 0, f"{max_rounds} rounds"
    for r in range(max_rounds):
        for n in (active if r % 2 == 0 else active[::-1]):
            check_stop()
            if est[n] < block_warmup_below_ms:
                fns[n](x)
            k = int(min(block_runs, max(1, block_s * 1000.0 // max(est[n], 1e-3))))  # the runs that fit
            rec = records[n]
            for _ in range(k):
                w, c = _timed(fns[n], x, clock)
                rec.wall_ms.append(w)
                rec.cpu_ms.append(c)
            rec.blocks += 1
            rec.rounds_ms[r] = (float(np.median(rec.wall_ms[-k:])), float(np.median(rec.cpu_ms[-k:])))
            est[n] = rec.p50
        rounds = r + 1
        if eliminate and len(active) > 1:
            iv = {n: median_interval(records[n].wall_ms, confidence) for n in active}
            fastest = min(records[n].p50 for n in active)
            if rounds >= min_rounds and max(hi for _, hi in iv.values()) <= fastest * (1 + decide_within):
                stopped = (f"tie after round {rounds}: {len(active)} variants within {decide_within:.0%} "
                           "of the fastest median")
                break
            best_hi = min(hi for _, hi in iv.values())
            for n in list(active):
                if iv[n][0] > best_hi and records[n].runs >= min_runs_to_eliminate:
                    active.remove(n)
                    records[n].stopped = f"eliminated after round {rounds}: cannot be the fastest"
            if len(active) == 1:
                stopped = f"decided after round {rounds}: only {active[0]} can be the fastest"
                break
        if time_budget_s is not None and rounds >= min_rounds and time.perf_counter() - t_start > time_budget_s:
            stopped = f"time budget {time_budget_s:.1f}s spent after round {rounds}"
            break
    for n in active:
        records[n].stopped = stopped
    return TimingRun(len(x), records, rounds, round(time.perf_counter() - t_start, 3), stopped)


def time_batch_sizes(fns: dict[str, Callable], sample: np.ndarray, batch_sizes: list[int], *,
                     time_budget_s: float | None = None, **kw) -> dict[int, TimingRun]:
    """``time_variants`` at each batch size (``sample`` tiled to the size); ``time_budget_s`` is the total, each
    batch size getting an equal share of what is left."""
    out: dict[int, TimingRun] = {}
    t0 = time.perf_counter()
    for i, bs in enumerate(batch_sizes):
        x = np.resize(sample, (bs, *sample.shape[1:])).astype(np.float32)
        share = None
        if time_budget_s is not None:
            share = max(0.0, time_budget_s - (time.perf_counter() - t0)) / (len(batch_sizes) - i)
        out[bs] = time_variants(fns, x, time_budget_s=share, **kw)
    return out


def paired_ratios(candidate: Callable[[], Any], reference: Callable[[], Any], seconds: float = 3.0,
                  min_rounds: int = 30, max_rounds: int = 20000, warmup: int = 5, warmup_s: float = 0.3,
                  clock: str = "cpu") -> dict:
    """Alternate candidate and reference calls (ABBA order) for ``seconds`` (wall); per-round time ratios.

    The latency gate's design: a ratio per round cancels load that hits both calls of the round. Each call is
    timed on ``clock`` (see CLOCKS). Warm-up runs at least ``warmup`` rounds and ``warmup_s`` seconds: the first
    fraction of a second after creating a session ran measurably faster or slower than the rest.

    Returns:
        {"ratios": [...], "candidate_ms": [...], "reference_ms": [...], "rounds": n, "seconds": s}
    """
    wall = time.perf_counter
    t_warm, i = wall(), 0
    while i < warmup or wall() - t_warm < warmup_s:
        candidate()
        reference()
        i += 1
    cand_ms, ref_ms = [], []
    now = CLOCKS[clock]
    start = wall()
    i = 0
    while i < max_rounds and (i < min_rounds or wall() - start < seconds):
        if i % 2 == 0:
            t0 = now(); candidate(); t1 = now(); reference(); t2 = now()  # noqa: E702
            c, r = t1 - t0, t2 - t1
        else:
            t0 = now(); reference(); t1 = now(); candidate(); t2 = now()  # noqa: E702
            r, c = t1 - t0, t2 - t1
        cand_ms.append(c * 1000.0)
        ref_ms.append(r * 1000.0)
        i += 1
    return {"ratios": [c / r for c, r in zip(cand_ms, ref_ms)], "candidate_ms": cand_ms, "reference_ms": ref_ms,
            "rounds": i, "seconds": round(wall() - start, 3)}


def with_planted_slowdown(fn: Callable[[], Any], fraction: float, clock: str = "cpu") -> Callable[[], Any]:
    """``fn`` made ``fraction`` slower: after each call, spin for ``fraction`` x that call's own time.

    The spin is measured on the gate's ``clock``, so the planted cost is exact in the unit the gate
    measures and scales with load like the model does. Used by bench/gate_proof.py.
    """
    if fraction <= 0:
        return fn
    if clock == "cuda":
        raise ValueError("a planted slowdown spins on a host clock: plant it with clock 'cpu' or 'wall'")
    now = CLOCKS[clock]

    def slowed():
        t0 = now()
        out = fn()
        end = now() + fraction * (now() - t0)
        while now() < end:
            pass
        return out

    return slowed


def logits_for(backends: dict[str, Any], batches) -> dict[str, np.ndarray]:
    """Run every backend on the same batches (each preprocessed once); their logits by name.

    ``batches``: an iterable of preprocessed float32 arrays (e.g. ``(x for x, _ in images.batches(pre, 64))``).
    """
    from .stop import check_stop

    out: dict[str, list[np.ndarray]] = {n: [] for n in backends}
    for x in batches:
        check_stop()
        for n, be in backends.items():
            out[n].append(be.run(x))
    return {n: np.concatenate(v) for n, v in out.items()}


def array_batches(x: np.ndarray, batch_size: int):
    """``x`` in consecutive slices of ``batch_size``."""
    return (x[i:i + batch_size] for i in range(0, len(x), batch_size))


