"""Per-process RSS of a real `bentoml serve` under N clients, sampled every 10 s: which worker grows, and for how long.

With --tracemalloc, the server runs bench/memtrace_service.py (tracemalloc on in every worker, a snapshot every
--every seconds) and the probe prints, per worker, the allocation sites that grew most between the snapshot
after the warm-up and the last one: what is still growing once the service is warm.

Usage:
    python bench/serve_memprobe.py ARTIFACT --seconds 300                    # serve_memprobe_300s.txt
    python bench/serve_memprobe.py ARTIFACT --seconds 300 --tracemalloc      # serve_memtrace.txt
    python bench/serve_memprobe.py ARTIFACT --seconds 300 --env MALLOC_ARENA_MAX=2
    python bench/serve_memprobe.py ARTIFACT --seconds 90 --idle 180         # growth with no requests?
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def sample_tree(pid: int) -> dict:
    """RSS MB of each server process, keyed "pid:command tail"."""
    from serve_load import read_each, server_processes

    rows = read_each(server_processes(pid), lambda p: (" ".join(p.cmdline()), p.memory_info().rss))
    return {f"{p.pid}:{cmd[-60:]}": round(rss / 2**20, 1) for p, (cmd, rss) in rows}


def growth_report(snap_dir: Path, after_s: float, top: int) -> str:
    """Per pid: the top allocation sites by growth between the first snapshot at >= after_s and the last."""
    import tracemalloc

    lines, by_pid = [], {}
    for meta in sorted(snap_dir.glob("*.json")):
        info = json.loads(meta.read_text())
        by_pid.setdefault(info["pid"], []).append((info, meta.with_suffix(".snap")))
    for pid, snaps in by_pid.items():
        base = next(((i, s) for i, s in snaps if i["t"] >= after_s), snaps[0])
        last = snaps[-1]
        lines.append(f"\n## pid {pid} ({last[0]['argv']})")
        lines.append("t s: " + ", ".join(f"{i['t']:.0f}" for i, _ in snaps))
        lines.append("rss MB: " + ", ".join(f"{i['rss_mb']:.1f}" for i, _ in snaps))
        lines.append("traced MB: " + ", ".join(f"{i['traced_mb']:.2f}" for i, _ in snaps))
        if base[1] == last[1]:
            continue
        keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
        new = tracemalloc.Snapshot.load(str(last[1])).filter_traces(keep)
        old = tracemalloc.Snapshot.load(str(base[1])).filter_traces(keep)
        lines.append(f"growth from t={base[0]['t']:.0f}s to t={last[0]['t']:.0f}s, top {top} sites by size:")
        for d in new.compare_to(old, "traceback")[:top]:
            lines.append(f"  {d.size_diff / 1024:+9.1f} KiB {d.count_diff:+7d} blocks")
            lines.extend(f"      {ln}" for ln in d.traceback.format(limit=6))
    return "\n".join(lines)


def main(argv=None) -> None:
    from serve_load import Server, env_pairs, run_clients, sampling, test_pngs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--idle", type=float, default=0, help="then keep sampling this many seconds with no load")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--every", type=float, default=30, help="seconds between tracemalloc snapshots")
    ap.add_argument("--after", type=float, default=90, help="compare snapshots from this time on (past the ramp)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--batching", default="0", help="DEPLOYKIT_BATCHING for the server")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra server environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = ap.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="memprobe-"))
    env, target = {"DEPLOYKIT_BATCHING": args.batching}, "deploykit.serving:Classifier"
    env.update(env_pairs(args.env))
    if args.tracemalloc:
        env.update(DEPLOYKIT_MEMTRACE_DIR=str(logdir / "snaps"), DEPLOYKIT_MEMTRACE_EVERY=str(args.every))
        target = "bench.memtrace_service:Classifier"
    with Server(args.artifact.resolve(), env, logdir / "server.log", target=target) as srv:
        srv.wait_ready()
        t0 = time.time()
        with sampling(lambda: (round(time.time() - t0), sample_tree(srv.proc.pid)), 10.0) as samples:
            res = run_clients(srv.url, test_pngs(), args.clients, args.seconds, "true")
            time.sleep(args.idle)  # does RSS still grow with no requests? (time-driven, not request-driven)
    print(f"requests ok {res['requests_ok']}, errors {res['errors']}, {res['throughput_rps']} req/s; server log {logdir}")
    for k in samples[-1][1]:
        print(k, [s[1].get(k) for s in samples])
    if args.tracemalloc:
        print(growth_report(logdir / "snaps", args.after, args.top))


if __name__ == "__main__":
    main()
