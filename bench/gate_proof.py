"""Prove the latency gate: false-alarm rate on A/A runs, detection rate on planted 10% and 25% slowdowns.

Each trial measures, in one process and in a shuffled order, a fresh baseline and three candidates of the
same artifact: unchanged (A/A), +10% and +25% (``deploykit.gate.with_planted_slowdown``: after
every model call, spin for that fraction of the call's own time, so the planted cost scales with load
exactly like the model). Each candidate is decided against
  * its own trial's baseline ("fresh": baseline and candidate measured seconds apart), and
  * every *other* trial's baseline ("stale": the baseline was recorded minutes earlier, as in CI),
at the limits --limits (default 5% and 10%). The CI does not depend on the limit, so one estimate serves all
limits. Each interval is the gate's: a block bootstrap of both runs' rounds, widened by the between-run spread
(--run-sd; auto = the standard deviation of log median ratio over this proof's baselines, the number
``deploykit.gate.stats.RUN_SD`` is set from). Coverage = how often the interval holds the planted size (0 for A/A).
--busy-cores N runs N busy-loop processes beside the proof (an outside process loading the machine).

Usage:
    python bench/gate_proof.py ARTIFACT --trials 60 --seconds 1.0 --batch 1 --out bench/results/gate_proof_bs1.json
    python bench/gate_proof.py ARTIFACT --trials 40 --busy-cores 1 --out bench/results/gate_proof_bs1_busy.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from deploykit.environment import machine_line, versions
from deploykit.gate import NOISY, OK, REGRESSION, decide_estimate, estimate, measure_gate, model_reference

CONDITIONS = {"A/A": 0.0, "+10%": 0.10, "+25%": 0.25}


def rates(codes: list[int]) -> dict:
    n = len(codes)
    return {"n": n, "pass": codes.count(OK), "regression": codes.count(REGRESSION), "undecided": codes.count(NOISY),
            "regression_rate": round(codes.count(REGRESSION) / n, 4) if n else None,
            "undecided_rate": round(codes.count(NOISY) / n, 4) if n else None}


def upper95(k: int, n: int) -> float:
    """Clopper-Pearson-style one-sided 95% upper bound on a rate with k events in n (exact via bisection)."""
    from math import comb

    if n == 0:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        cdf = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        lo, hi = (p, hi) if cdf > 0.05 else (lo, p)
    return round(hi, 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time of one gate run (per side)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limits", default="0.05,0.10")
    ap.add_argument("--reference", choices=("model", "synthetic"), default="model")
    ap.add_argument("--clock", choices=("cpu", "wall", "both"), default="cpu",
                    help="both: every trial measures with each clock, interleaved, for a fair comparison")
    ap.add_argument("--stale-pairs", type=int, default=5, help="other-trial baselines per candidate (stale mode)")
    ap.add_argument("--out", default="bench/results/gate_proof_bs1.json")
    ap.add_argument("--raw", default=None, help="also save every run's per-round ratios to this .npz")
    ap.add_argument("--run-sd", default="auto", help="between-run spread for the intervals: auto (from this proof's "
                                                      "baselines), or a number (0 = within-run noise only)")
    ap.add_argument("--busy-cores", type=int, default=0, help="outside busy-loop processes during the proof")
    args = ap.parse_args()
    limits = [float(v) for v in args.limits.split(",")]

    import subprocess

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_cores)]
    try:
        return run(args, limits)
    finally:
        for proc in busy:
            proc.kill()


def planted_sizes(args, clock: str, seconds: float = 4.0) -> dict[str, float]:
    """Each condition's true slowdown, measured independently of the gate: the planted model against the plain
    one, call by call (ABBA, ``deploykit.measure.paired_ratios``), median ratio - 1. The spin around a call costs a
    little more than its nominal fraction, so the nominal number is not the truth (+10% measured +13% before)."""
    from deploykit.artifact import Artifact
    from deploykit.gate.measure import _gate_input
    from deploykit.measure import paired_ratios, with_planted_slowdown

    art = Artifact.open(args.artifact)
    backend = art.backend(threads=args.threads)
    x = _gate_input(args.batch, art.preprocessing.input_size)

    def plain():
        return backend.run(x)

    out = {}
    for cond, frac in CONDITIONS.items():
        r = paired_ratios(with_planted_slowdown(plain, frac, clock), plain, seconds=seconds, clock=clock)
        out[cond] = round(float(np.median(r["ratios"])) - 1.0, 4) if frac else 0.0
    return out


def run(args, limits) -> int:
    t_start = time.perf_counter()
    # the gate's default reference: the baseline's own deployed model (here: the artifact's file, in place)
    reference = model_reference(args.artifact) if args.reference == "model" else {"kind": "synthetic", "repeats": None}
    clocks = ["cpu", "wall"] if args.clock == "both" else [args.clock]
    first = measure_gate(args.artifact, args.batch, reference, threads=args.threads, seconds=args.seconds,
                         clock=clocks[0])
    reference = first["reference"]  # synthetic: repeats now fixed for all runs, as a stored baseline fixes it
    print(f"{first['key']}: model p50 {first['candidate_ms_p50']:.3f} ms, reference ({reference['kind']}) "
          f"{first['reference_ms_p50']:.3f} ms, {first['rounds']} rounds/{args.seconds}s", flush=True)
    truth = planted_sizes(args, clocks[0])
    print(f"planted sizes measured directly (planted vs plain calls, paired): {truth}", flush=True)
    rng = random.Random(0)
    all_baselines: dict[str, list[list[float]]] = {c: [] for c in clocks}
    all_runs: list[dict] = []  # {"clock", "trial", "condition", "ratios", "median", "rounds"}
    for t in range(args.trials):
        order = [(clk, cond) for clk in clocks for cond in ("baseline", *CONDITIONS)]
        rng.shuffle(order)
        for clk, cond in order:
            m = measure_gate(args.artifact, args.batch, reference, threads=args.threads, seconds=args.seconds,
                             slowdown=CONDITIONS.get(cond, 0.0), clock=clk)
            if cond == "baseline":
                all_baselines[clk].append(m["ratios"])
            else:
                all_runs.append({"clock": clk, "trial": t, "condition": cond, "ratios": m["ratios"],
                                 "median": m["median_ratio"], "rounds": m["rounds"], "load": os.getloadavg()[0]})
        if (t + 1) % 10 == 0:
            print(f"trial {t + 1}/{args.trials}, {time.perf_counter() - t_start:.0f}s, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    measure_s = time.perf_counter() - t_start
    if args.raw:  # the raw rounds, so the analysis can be redone offline
        np.savez_compressed(args.raw, **{f"baseline_{c}_{t}": np.asarray(b, np.float32)
                                         for c, bs in all_baselines.items() for t, b in enumerate(bs)},
                            **{f"run_{i}_{r['clock']}_{r['condition'].replace('/', '').replace('%', 'pct').replace('+', 'plus')}"
                               f"_t{r['trial']}": np.asarray(r["ratios"], np.float32) for i, r in enumerate(all_runs)})

    by_clock: dict = {}
    for clk in clocks:
        baselines, runs = all_baselines[clk], [r for r in all_runs if r["clock"] == clk]
        run_sd = (float(np.std(np.log([np.median(b) for b in baselines]), ddof=1)) if args.run_sd == "auto"
                  else float(args.run_sd))
        covered: dict = {"fresh": {c: [] for c in CONDITIONS}, "stale": {c: [] for c in CONDITIONS}}
        results: dict = {"fresh": {}, "stale": {}}
        slowdowns: dict = {"fresh": {c: [] for c in CONDITIONS}, "stale": {c: [] for c in CONDITIONS}}
        codes: dict = {mode: {(c, p): [] for c in CONDITIONS for p in limits} for mode in results}
        widths = {mode: [] for mode in results}
        for i, r in enumerate(runs):
            pairs = [("fresh", r["trial"])]
            others = [t for t in range(args.trials) if t != r["trial"]]
            pairs += [("stale", t) for t in random.Random(i).sample(others, min(args.stale_pairs, len(others)))]
            for mode, bt in pairs:
                est = estimate(r["ratios"], baselines[bt], resamples=1000, seed=i, run_sd=run_sd)
                slowdowns[mode][r["condition"]].append(est.slowdown)
                covered[mode][r["condition"]].append(est.ci[0] <= truth[r["condition"]] <= est.ci[1])
                widths[mode].append(est.ci[1] - est.ci[0])
                for p in limits:
                    codes[mode][(r["condition"], p)].append(decide_estimate(est, p).exit_code)
        for mode in results:
            for (cond, p), cs in codes[mode].items():
                entry = rates(cs)
                if cond == "A/A":
                    entry["false_alarm_upper95"] = upper95(entry["regression"], entry["n"])
                results[mode][f"{cond} @ limit {p:.0%}"] = entry
            for cond, xs in slowdowns[mode].items():
                xs = sorted(xs)
                results[mode][f"{cond} measured slowdown"] = {
                    "median": round(xs[len(xs) // 2], 4), "p5": round(xs[int(0.05 * len(xs))], 4),
                    "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 4)}
            ws = sorted(widths[mode])
            results[mode]["ci_width_median"] = round(ws[len(ws) // 2], 4)
            results[mode]["coverage_of_planted_size"] = {c: round(sum(v) / len(v), 4) for c, v in
                                                         covered[mode].items() if v}
        results["run_sd"] = round(run_sd, 5)

        results["rounds_per_run_median"] = sorted(r["rounds"] for r in runs)[len(runs) // 2]
        by_clock[clk] = results
    runs = all_runs
    load = [r["load"] for r in runs]
    out = {
        "schema": "deploykit.gate-proof/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_line(),
        "versions": {k: v for k, v in versions().items() if k in ("python", "onnxruntime", "openvino", "numpy")},
        "artifact": str(args.artifact), "key": first["key"], "batch": args.batch, "threads": args.threads,
        "seconds_per_run": args.seconds, "trials": args.trials, "busy_cores": args.busy_cores,
        "reference": reference["kind"], "clocks": clocks, "planted_sizes_measured": truth,
        "reference_repeats": reference.get("repeats"), "nice": os.nice(0),
        "model_ms_p50": first["candidate_ms_p50"], "reference_ms_p50": first["reference_ms_p50"],
        "load_average_1min": {"min": round(min(load), 2), "max": round(max(load), 2),
                              "median": round(sorted(load)[len(load) // 2], 2)},
        "measure_seconds": round(measure_s, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "results": by_clock,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    for clk, results in by_clock.items():
        for mode in ("fresh", "stale"):
            print(f"\n{clk} clock, {mode} baselines:")
            for k, v in results[mode].items():
                print(f"  {k}: {v}")
    print(f"\nwrote {path} ({out['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
