"""deploykit.serving's services with tracemalloc on, for finding what grows in a worker under load.

Every process that imports this module (the API worker, the model worker) starts tracemalloc and dumps a
snapshot every DEPLOYKIT_MEMTRACE_EVERY seconds (default 30) to DEPLOYKIT_MEMTRACE_DIR/<pid>-<n>.snap, with
the process's RSS in the name's sidecar <pid>-<n>.json. Used by bench/serve_memprobe.py --tracemalloc.
Diagnostics only: tracemalloc roughly halves the service's throughput.

Example:
    DEPLOYKIT_MEMTRACE_DIR=/tmp/mt DEPLOYKIT_ARTIFACT=ref.deploykit \
        bentoml serve bench.memtrace_service:Classifier --port 3000
"""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

DIR = os.environ.get("DEPLOYKIT_MEMTRACE_DIR")
EVERY = float(os.environ.get("DEPLOYKIT_MEMTRACE_EVERY", 30))

if DIR:
    tracemalloc.start(int(os.environ.get("DEPLOYKIT_MEMTRACE_FRAMES", 8)))

    def _dump_forever() -> None:
        import psutil

        out, n, t0 = Path(DIR), 0, time.time()
        out.mkdir(parents=True, exist_ok=True)
        while True:
            time.sleep(EVERY)
            snap = tracemalloc.take_snapshot()
            stem = out / f"{os.getpid()}-{n:03d}"
            snap.dump(f"{stem}.snap")
            traced, peak = tracemalloc.get_traced_memory()
            stem.with_suffix(".json").write_text(json.dumps({
                "pid": os.getpid(), "t": round(time.time() - t0, 1), "rss_mb": psutil.Process().memory_info().rss / 2**20,
                "traced_mb": traced / 2**20, "peak_mb": peak / 2**20, "argv": " ".join(psutil.Process().cmdline())[-80:]}))
            n += 1

    threading.Thread(target=_dump_forever, name="memtrace", daemon=True).start()

from deploykit.serving import Classifier, ClassifierModel  # noqa: E402,F401
