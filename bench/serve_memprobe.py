"""Per-process RSS of a real `bentoml serve` under 8 clients, sampled every 10 s (which worker grows, and for how long).

Usage: python bench/serve_memprobe.py ARTIFACT SECONDS    (batching off, tta=true; prints one row per process)
"""
import sys, threading, time, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench")); sys.path.insert(0, str(ROOT))
import psutil
from serve_load import Server, test_pngs, run_clients
art = Path(sys.argv[1]); secs = float(sys.argv[2])
logdir = Path(tempfile.mkdtemp())
with Server(art, {"DEPLOYKIT_BATCHING": "0"}, logdir / "s.log") as srv:
    srv.wait_ready()
    pngs = test_pngs()
    samples = []
    stop = threading.Event()
    def mon():
        t0 = time.time()
        while not stop.wait(10.0):
            root = psutil.Process(srv.proc.pid)
            row = {}
            for p in [root, *root.children(recursive=True)]:
                try:
                    name = " ".join(p.cmdline())[-60:]
                    row[f"{p.pid}:{name}"] = round(p.memory_info().rss / 2**20, 1)
                except psutil.NoSuchProcess:
                    pass
            samples.append((round(time.time() - t0), row))
    th = threading.Thread(target=mon, daemon=True); th.start()
    res = run_clients(srv.url, pngs, 8, secs, "true")
    stop.set(); th.join(5)
    print(res["requests_ok"] if "requests_ok" in res else res.keys())
    keys = samples[-1][1].keys()
    for k in keys: print(k, [s[1].get(k) for s in samples])
