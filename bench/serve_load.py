"""Load test: N concurrent clients for T seconds against the real `bentoml serve` on 127.0.0.1.

For each mode (adaptive batching on, then off) it starts the server on a free port, waits for /readyz,
warms up, then runs the clients (threads, each with its own HTTP session, posting Fashion-MNIST test
images as PNG to /classify) until the deadline. It reports throughput, p50/p90/p99 latency, errors,
and the server's memory (RSS summed over its process tree) before, during (every second) and after.

Bounded by construction: clients <= 64, seconds <= 600, every request has a timeout, the server
process group is always terminated.

Example:
    python bench/serve_load.py --artifact ref.deploykit --clients 8 --seconds 30
    python bench/serve_load.py --clients 8 --seconds 120 --modes on      # the 2-minute memory check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from deploykit.artifact import write_json, write_text
from reference_artifact import add_artifact_args, build_artifact

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_artifact_args(p, "serve this artifact instead of compressing --checkpoint")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--modes", default="on,off", help="adaptive batching modes to run, in order (repeats allowed: "
                                                      "on,off,off,on cancels drift)")
    p.add_argument("--tta", choices=("true", "false"), default="true")
    p.add_argument("--threads", type=int, default=None, help="DEPLOYKIT_THREADS for the model worker")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment, e.g. DEPLOYKIT_WORKERS=2 (repeatable)")
    p.add_argument("--tta-rounds", type=int, default=200,
                   help="before the load (batching-on server): one client alternating tta=true/false requests, "
                        "this many of each, for the per-request cost of TTA (0 = skip)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)")
    a = p.parse_args(argv)
    a.clients, a.seconds = max(1, min(a.clients, 64)), max(1.0, min(a.seconds, 600.0))
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_processes(pid: int) -> list:
    """The server's process tree, root first; empty once the server is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def read_each(procs: list, read) -> list[tuple]:
    """(process, read(process)) for each process still alive: a worker may exit between listing and reading."""
    import psutil

    out = []
    for p in procs:
        try:
            out.append((p, read(p)))
        except psutil.NoSuchProcess:
            pass
    return out


def process_role(cmdline: str) -> str:
    """api (the HTTP front), model (the model service) or root (the bentoml serve supervisor)."""
    return "model" if "deploykit-model" in cmdline else "api" if "--worker-id" in cmdline else "root"


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """user+system CPU seconds of every process in the server tree, keyed by role (api/model/root)."""
    out: dict[str, float] = {}
    for _, (cmd, t) in read_each(server_processes(pid), lambda p: (" ".join(p.cmdline()), p.cpu_times())):
        role = process_role(cmd)
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def tree_rss_mb(pid: int) -> float:
    procs = server_processes(pid)
    if not procs:
        return float("nan")
    return round(sum(rss for _, rss in read_each(procs, lambda p: p.memory_info().rss)) / 2**20, 1)


@contextlib.contextmanager
def sampling(fn, every_s: float):
    """Call ``fn()`` every ``every_s`` seconds on a background thread while the block runs; yields the list its
    results are appended to (e.g. the server's RSS over a load test)."""
    samples, stop = [], threading.Event()

    def loop():
        while not stop.wait(every_s):
            samples.append(fn())
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield samples
    finally:
        stop.set()
        th.join(5)


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """--env KEY=VALUE options -> a dict for the server's environment."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        sys.exit(f"error: --env {bad[0]!r} is not KEY=VALUE. Fix: e.g. --env DEPLOYKIT_WORKERS=2")
    return dict(kv.split("=", 1) for kv in pairs)


class Server:
    """`bentoml serve TARGET` (default deploykit.serving:Classifier) in its own process group; always stopped on exit."""

    def __init__(self, artifact: Path, env: dict, log: Path, target: str = "deploykit.serving:Classifier"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "DEPLOYKIT_ARTIFACT": str(artifact), **env}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", target,
                                      "--port", str(self.port), "--host", "127.0.0.1"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def test_pngs(n: int = 200) -> list[bytes]:
    from PIL import Image

    from deploykit.data.fashion_mnist import load_fashion_mnist

    ds = load_fashion_mnist("test")
    out = []
    for img in ds.images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def run_clients(url: str, pngs: list[bytes], clients: int, seconds: float, tta: str) -> dict:
    import requests

    latencies: list[list[float]] = [[] for _ in range(clients)]
    in_time = [0] * clients  # successes finished by the deadline: throughput must not count a straggler's wait
    errors: list[dict] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(i: int) -> None:
        with requests.Session() as s:
            k = i
            while time.monotonic() < deadline:
                data = pngs[k % len(pngs)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = s.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")},
                               data={"tta": tta}, timeout=30)
                    ok = r.status_code == 200
                    err = None if ok else f"HTTP {r.status_code}: {r.text[:120]}"
                except requests.RequestException as e:
                    ok, err = False, f"{type(e).__name__}: {str(e)[:120]}"
                ms = (time.perf_counter() - t0) * 1e3
                if ok:
                    latencies[i].append(ms)
                    in_time[i] += time.monotonic() <= deadline
                else:
                    with lock:  # when, so that it can be found in the server log
                        errors.append({"client": i, "error": err, "sent_at_s": round(time.monotonic() - start - ms / 1e3, 2),
                                       "sent_utc": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(milliseconds=ms)
                                                    ).isoformat(timespec="milliseconds"),
                                       "ms": round(ms, 1)})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)  # each request times out after 30 s, so this always returns
    wall = time.monotonic() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(0)
    pct = np.percentile(lat, [50, 90, 99]).round(2).tolist() if len(lat) else [None] * 3
    return {"requests_ok": int(len(lat)), "errors": len(errors), "error_samples": errors[:5],
            "wall_s": round(wall, 2), "throughput_rps": round(sum(in_time) / seconds, 2),
            "latency_ms": {"p50": pct[0], "p90": pct[1], "p99": pct[2],
                           "max": round(float(lat.max()), 2) if len(lat) else None}}


def tta_request_cost(url: str, pngs: list[bytes], rounds: int) -> dict:
    """One client, requests alternating tta=true / tta=false (interleaved, so load noise hits both alike)."""
    import requests

    ms = {"true": [], "false": []}
    with requests.Session() as s:
        for i in range(rounds):
            order = ("true", "false") if i % 2 == 0 else ("false", "true")
            for tta in order:
                t0 = time.perf_counter()
                r = s.post(f"{url}/classify", files={"image": ("x.png", pngs[i % len(pngs)], "image/png")},
                           data={"tta": tta}, timeout=30)
                r.raise_for_status()
                ms[tta].append((time.perf_counter() - t0) * 1e3)
    p50 = {k: float(np.median(v)) for k, v in ms.items()}
    ratios = np.asarray(ms["true"]) / np.asarray(ms["false"])
    return {"rounds": rounds, "p50_ms_tta": round(p50["true"], 3), "p50_ms_no_tta": round(p50["false"], 3),
            "ratio_of_p50": round(p50["true"] / p50["false"], 3), "median_pair_ratio": round(float(np.median(ratios)), 3)}


def run_mode(artifact: Path, mode: str, args, pngs: list[bytes], logdir: Path) -> dict:
    import requests

    env = {"DEPLOYKIT_BATCHING": "1" if mode == "on" else "0"}
    if args.threads:
        env["DEPLOYKIT_THREADS"] = str(args.threads)
    env.update(env_pairs(args.env))
    with Server(artifact, env, logdir / f"server-{mode}.log") as srv:
        srv.wait_ready()
        for data in pngs[:20]:  # warm-up (and the dispatcher's own latency training)
            requests.post(f"{srv.url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=30)
        tta_cost = tta_request_cost(srv.url, pngs, args.tta_rounds) if args.tta_rounds and mode == "on" else None
        rss_before = tree_rss_mb(srv.proc.pid)
        with sampling(lambda: tree_rss_mb(srv.proc.pid), 1.0) as samples:
            cpu0 = tree_cpu_seconds(srv.proc.pid)
            res = run_clients(srv.url, pngs, args.clients, args.seconds, args.tta)
            cpu1 = tree_cpu_seconds(srv.proc.pid)
        # where the CPU goes: ms of CPU per served request, per role (the load generator is not counted)
        res["cpu_ms_per_request"] = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / max(res["requests_ok"], 1), 2)
                                     for k in cpu1}
        if tta_cost:
            res["tta_request_cost"] = tta_cost
        res.update({"mode": f"batching {mode}", "rss_mb": {"before": rss_before, "after": tree_rss_mb(srv.proc.pid),
                                                           "max": max(samples, default=None),
                                                           "samples_every_1s": samples}})
        srv.log.flush()
        text = Path(srv.log.name).read_text(errors="replace").splitlines()
        res["model_call_retries"] = sum("model call dropped" in ln for ln in text)  # see service._infer
        if res["errors"]:  # keep the evidence: the server's traceback lines
            res["server_log_errors"] = [ln for ln in text if "Error" in ln or "error" in ln][:20]
        meta = requests.post(f"{srv.url}/metadata", timeout=10).json()
        res["server"] = {"batching": meta["model"]["batching"], "max_batch_size": meta["model"]["max_batch_size"],
                         "max_latency_ms": meta["model"]["max_latency_ms"], "backend": meta["model"]["backend"]}
        return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    pngs = test_pngs()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        artifact = build_artifact(args, Path(tmp))
        logs = args.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        runs = [run_mode(artifact.resolve(), m.strip(), args, pngs, logs) for m in args.modes.split(",")]
    result = {"what": "load test of bentoml serve deploykit.serving:Classifier on 127.0.0.1",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "clients": args.clients, "seconds": args.seconds, "tta": args.tta, "server_env": args.env,
              "machine": {"cpu_count": os.cpu_count(), "loadavg_1_5_15": os.getloadavg()},
              "artifact": str(args.artifact or args.checkpoint), "runs": runs,
              "command": "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    # modes may repeat (--modes on,off,off,on): the gain is the ratio of the mean throughputs
    on = [r["throughput_rps"] for r in runs if r["mode"] == "batching on"]
    off = [r["throughput_rps"] for r in runs if r["mode"] == "batching off"]
    if on and off and min(off) > 0:
        result["batching_throughput_gain"] = round(float(np.mean(on) / np.mean(off)), 3)
    write(result, args.out)
    return result


def _cpu_cell(run: dict) -> str:
    cpu = run.get("cpu_ms_per_request", {})
    return " / ".join(f"{cpu[k]:.2f}" if k in cpu else "n/a" for k in ("api", "model"))


def write(result: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), result)
    rows = "\n".join(
        f"| {r['mode']} | {r['throughput_rps']:.1f} | {r['latency_ms']['p50']} | {r['latency_ms']['p90']} | "
        f"{r['latency_ms']['p99']} | {r['requests_ok']} | {r['errors']} | {r['model_call_retries']} | "
        f"{r['rss_mb']['before']} -> "
        f"{r['rss_mb']['after']} (max {r['rss_mb']['max']}) | "
        f"{_cpu_cell(r)} |"
        for r in result["runs"])
    gain = result.get("batching_throughput_gain")
    tc = next((r["tta_request_cost"] for r in result["runs"] if r.get("tta_request_cost")), None)
    tta_md = (f"\nPer-request cost of TTA (one client, {tc['rounds']} interleaved pairs, batching-on server): "
              f"p50 {tc['p50_ms_tta']:.2f} ms with 4-view TTA vs {tc['p50_ms_no_tta']:.2f} ms without = "
              f"**{tc['ratio_of_p50']:.2f}x** (median per-pair ratio {tc['median_pair_ratio']:.2f}x).\n") if tc else ""
    md = f"""# Serving load test ({result['date']})

{result['clients']} concurrent clients x {result['seconds']:.0f} s per mode, POST /classify (tta={result['tta']}),
server environment: {' '.join(result.get('server_env') or []) or 'defaults'},
Fashion-MNIST test images as PNG, server and clients on the same shared 2-core machine
(load average {', '.join(f'{v:.1f}' for v in result['machine']['loadavg_1_5_15'])}: absolute numbers are noisy).

| mode | req/s | p50 ms | p90 ms | p99 ms | ok | errors | retried model calls | server RSS MB before -> after | CPU ms/request api / model |
|---|---|---|---|---|---|---|---|---|---|
{rows}
{f'''
Adaptive batching throughput gain: **{gain:.2f}x**.''' if gain else ''}
{tta_md}
Reproduce: `{result['command']}`
"""
    write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
    print(parse_args().out.with_suffix(".md").read_text())
