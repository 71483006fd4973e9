"""Hostile-but-fair load test: many concurrent clients, half of their requests bad, against the real `bentoml serve`.

For each server configuration in --placements (the model in the front's process, or in its own BentoML service) it
starts the server on a free 127.0.0.1 port, warms it up, then runs --clients asyncio clients (each its own HTTP
connection) for --seconds. Each request is good (a Fashion-MNIST test PNG to /classify or /classify_batch, random
top_k and tta) or, with probability --bad-share, one of the bad kinds below. It counts every status code per kind,
checks every good answer against the artifact run directly in this process (deploykit's Artifact backend on the same
decoded, preprocessed image; labels and order equal, probabilities within 2e-5), and samples the server's RSS (summed
over its process tree) before, during and after the load.

Bounded by construction: clients <= 400, seconds <= 600, each request times out after 30 s, the server process group
is always terminated, and the largest body sent is one oversize upload (the /classify cap + 64 KiB) at a time.

Example:
    python bench/serve_hostile.py --clients 200 --seconds 60
    python bench/serve_hostile.py --clients 200 --seconds 20 --bad-share 0 --large-share 0 \
        --placements in-process,service,service,in-process --stem serve_placement
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from reference_artifact import add_artifact_args, build_artifact
from results_io import stamped, write_results
from serve_load import Server, env_pairs, sampling, tree_rss_mb

ROOT = Path(__file__).resolve().parents[1]
TTA_ALL = ("original", "hflip", "scale:0.9", "scale:1.1")  # the service's default DEPLOYKIT_TTA
REQUEST_TIMEOUT_S = 30.0

# bad kinds: (name, weight, expected status). Weights are relative among the bad requests; the oversize body is rare
# because each one moves 21 MiB through loopback on the same two cores.
BAD_KINDS = [
    ("corrupt image bytes", 10, 400),
    ("truncated PNG", 10, 400),
    ("text in the image field", 10, 400),
    ("empty body", 10, 400),
    ("empty file", 5, 400),
    ("unknown form field", 5, 400),
    ("top_k not an int", 10, 400),
    ("tta not a mode", 5, 400),
    ("wrong content type", 10, 415),
    ("JSON body", 5, 415),
    ("unknown path", 10, 404),
    ("wrong method", 10, 405),
    ("decompression bomb header", 5, 413),
    ("oversize body", 1, 413),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_artifact_args(p, "serve this artifact instead of compressing --checkpoint")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--bad-share", type=float, default=0.5, help="share of requests that are bad (0..1)")
    p.add_argument("--large-share", type=float, default=0.002,
                   help="share of requests that are a 36-megapixel all-black PNG (valid, ~100 KB; tests the decode "
                        "budget: answered 200, or 503 + Retry-After when the budget stays full)")
    p.add_argument("--placements", default="in-process",
                   help="server configurations to run in order: in-process (default) and/or service "
                        "(DEPLOYKIT_MODEL_SERVICE=1), each optionally with extra environment after colons "
                        "(in-process:DEPLOYKIT_MMAP_THRESHOLD=0); repeats allowed (a,b,b,a cancels drift)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--stem", default="serve_hostile")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)")
    a = p.parse_args(argv)
    a.clients, a.seconds = max(1, min(a.clients, 400)), max(1.0, min(a.seconds, 600.0))
    a.bad_share, a.large_share = min(max(a.bad_share, 0.0), 1.0), min(max(a.large_share, 0.0), 0.1)
    return a


# ---------------------------------------------------------------------------------------------------------------
# requests

def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_payloads(n_images: int = 200) -> dict:
    from PIL import Image

    from deploykit.data.fashion_mnist import load_fashion_mnist

    ds = load_fashion_mnist("test")
    good = [encode_png(Image.fromarray(img)) for img in ds.images[:n_images]]
    return {"good": good, "large": encode_png(Image.new("RGB", (6000, 6000))),  # 36 MP, ~105 KB
            "bomb": png_header_only(100_000, 100_000)}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's) with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def multipart(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    """(name, data, filename or None for a text field) -> (body, content type), built by hand: every shape exact."""
    boundary = "deploykitHostile7MA4YWxk"
    out = []
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
        if filename:
            head += "Content-Type: image/png\r\n"
        out.append(head.encode() + b"\r\n" + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def good_request(rng: random.Random, pngs: list[bytes]) -> dict:
    """A valid request and what the artifact run directly must answer for it."""
    k = rng.randint(1, 10)
    tta = rng.choice([None, None, "none", "all"])
    fields = [("top_k", str(k).encode(), None)] + ([("tta", tta.encode(), None)] if tta else [])
    if rng.random() < 0.2:
        idx = [rng.randrange(len(pngs)) for _ in range(rng.randint(2, 4))]
        body, ctype = multipart([("images", pngs[i], f"{i}.png") for i in idx] + fields)
        return {"kind": "good /classify_batch", "path": "/classify_batch", "body": body, "ctype": ctype,
                "expect": 200, "check": (idx, tta, k)}
    i = rng.randrange(len(pngs))
    body, ctype = multipart([("image", pngs[i], "x.png")] + fields)
    return {"kind": "good /classify", "path": "/classify", "body": body, "ctype": ctype, "expect": 200,
            "check": ([i], tta, k)}


def bad_request(kind: str, rng: random.Random, payloads: dict, oversize: bytes) -> dict:
    png = payloads["good"][rng.randrange(len(payloads["good"]))]
    req = {"kind": kind, "method": "POST", "path": "/classify"}
    if kind == "corrupt image bytes":
        data = b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(10, 4000))
        req["body"], req["ctype"] = multipart([("image", data, "x.png")])
    elif kind == "truncated PNG":
        req["body"], req["ctype"] = multipart([("image", png[: len(png) // 2], "x.png")])
    elif kind == "text in the image field":
        req["body"], req["ctype"] = multipart([("image", b"http://127.0.0.1:9/x.png", None)])
    elif kind == "empty body":
        req["body"], req["ctype"] = b"", "multipart/form-data; boundary=x"
    elif kind == "empty file":
        req["body"], req["ctype"] = multipart([("image", b"", "x.png")])
    elif kind == "unknown form field":
        req["body"], req["ctype"] = multipart([("file", png, "x.png")])
    elif kind == "top_k not an int":
        req["body"], req["ctype"] = multipart([("image", png, "x.png"), ("top_k", b"five", None)])
    elif kind == "tta not a mode":
        req["body"], req["ctype"] = multipart([("image", png, "x.png"), ("tta", b"maybe", None)])
    elif kind == "wrong content type":
        req["body"], req["ctype"] = png, "image/png"
    elif kind == "JSON body":
        req["body"], req["ctype"] = json.dumps({"image": "/etc/passwd"}).encode(), "application/json"
    elif kind == "unknown path":
        req["method"] = rng.choice(["GET", "POST"])
        req["path"] = f"/{rng.randbytes(6).hex()}/{rng.randint(0, 10**9)}"
        req["body"], req["ctype"] = b"", None
    elif kind == "wrong method":
        req["method"], req["body"], req["ctype"] = rng.choice(["GET", "PUT", "DELETE"]), b"", None
    elif kind == "decompression bomb header":
        req["body"], req["ctype"] = multipart([("image", payloads["bomb"], "x.png")])
    elif kind == "oversize body":
        req["body"], req["ctype"] = oversize, multipart([])[1]
    else:  # pragma: no cover
        raise ValueError(kind)
    req["expect"] = dict((k, s) for k, _, s in BAD_KINDS)[kind]
    return req


# ---------------------------------------------------------------------------------------------------------------
# the artifact run directly: the reference every good answer must match

class Reference:
    def __init__(self, artifact: Path, pngs: list[bytes]):
        from deploykit.artifact import Artifact
        from deploykit.serving.decode import decode_image

        art = Artifact.open(artifact)
        self.backend, self.pre, self.policy = art.backend(threads=1), art.preprocessing, art.tta_policy
        self.names = list(self.pre.class_names)
        self.x = [self.pre.from_pil(decode_image(p)) for p in pngs]
        self._cache: dict = {}

    def answer(self, i: int, tta: str | None, k: int) -> dict:
        """What the service answers for image i: the same views and policy as service._classify."""
        from deploykit.serving.tta import predict

        mode = tta or "policy"
        if mode == "policy":
            mode = self.policy.mode if self.policy is not None else "all"
        key = (i, mode, k)
        if key not in self._cache:
            if mode == "selective":
                got = predict(self.backend, self.x[i], (), k, self.names, policy=self.policy)[0]
            else:
                got = predict(self.backend, self.x[i], TTA_ALL if mode == "all" else ("original",), k, self.names)[0]
            self._cache[key] = got
        return self._cache[key]


def compare(got: dict, want: dict) -> float | None:
    """Largest probability difference, or None when labels, order or view counts differ."""
    if got.get("tta_views") != want["tta_views"]:
        return None
    g, w = got.get("predictions", []), want["predictions"]
    if [p.get("index") for p in g] != [p["index"] for p in w] or [p.get("label") for p in g] != [p["label"] for p in w]:
        return None
    return max(abs(a["probability"] - b["probability"]) for a, b in zip(g, w))


# ---------------------------------------------------------------------------------------------------------------
# the load

async def run_load(url: str, args, payloads: dict, ref: Reference) -> dict:
    import aiohttp

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unexpected: list[dict] = []
    lat_good: list[float] = []
    retry_after = collections.Counter()
    diffs: list[float] = []
    mismatches: list[dict] = []
    good_in_time = [0]
    kinds, weights = [k for k, _, _ in BAD_KINDS], [w for _, w, _ in BAD_KINDS]
    cap = 20 * 2**20 + 2**20  # the /classify body cap with default limits
    oversize = multipart([("image", b"\0" * (cap + 64 * 1024), "x.png")])[0]
    start = time.monotonic()
    deadline = start + args.seconds

    async def client(cid: int) -> None:
        rng = random.Random(args.seed * 100_003 + cid)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as s:
            while time.monotonic() < deadline:
                r = rng.random()
                if r < args.large_share:
                    body, ctype = multipart([("image", payloads["large"], "big.png")])
                    req = {"kind": "large image (36 MP)", "path": "/classify", "body": body, "ctype": ctype,
                           "expect": 200, "large": True}
                elif r < args.large_share + args.bad_share:
                    req = bad_request(rng.choices(kinds, weights)[0], rng, payloads, oversize)
                else:
                    req = good_request(rng, payloads["good"])
                headers = {"Content-Type": req["ctype"]} if req.get("ctype") else {}
                t0 = time.perf_counter()
                try:
                    async with s.request(req.get("method", "POST"), url + req["path"], data=req["body"],
                                         headers=headers) as resp:
                        text = await resp.read()
                        status = resp.status
                        ra = resp.headers.get("Retry-After")
                except asyncio.TimeoutError:
                    status, text, ra = "timeout", b"", None
                except aiohttp.ClientError as err:
                    status, text, ra = f"connection error ({type(err).__name__})", b"", None
                ms = (time.perf_counter() - t0) * 1e3
                counts[req["kind"]][str(status)] += 1
                if status == 503:
                    retry_after[str(ra)] += 1
                ok = status == req["expect"] or (req.get("large") and status == 503 and ra)
                if not ok:
                    unexpected.append({"kind": req["kind"], "status": status, "expected": req["expect"],
                                       "body": text[:200].decode("utf-8", "replace"), "ms": round(ms, 1)})
                    continue
                if status != 200 or "check" not in req:
                    continue
                lat_good.append(ms)
                good_in_time[0] += time.monotonic() <= deadline
                idx, tta, k = req["check"]
                got = json.loads(text)
                got = got if isinstance(got, list) else [got]
                for g, i in zip(got, idx):
                    d = compare(g, ref.answer(i, tta, k))
                    if d is None or d > 2e-5:
                        mismatches.append({"image": i, "tta": tta, "k": k, "got": g, "diff": d})
                    else:
                        diffs.append(d)
                if len(got) != len(idx):
                    mismatches.append({"images": idx, "got": got})

    await asyncio.gather(*(client(i) for i in range(args.clients)))
    wall = time.monotonic() - start
    lat = np.asarray(lat_good) if lat_good else np.zeros(1)
    all_status = collections.Counter()
    for c in counts.values():
        all_status.update(c)
    return {"wall_s": round(wall, 1), "requests": sum(all_status.values()),
            "status_counts": dict(sorted(all_status.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
            "server_errors_5xx": sum(v for s, v in all_status.items() if s.isdigit() and int(s) >= 500),
            "refused_503": all_status.get("503", 0), "retry_after_on_503": dict(retry_after),
            "connection_errors_or_timeouts": sum(v for s, v in all_status.items() if not s.isdigit()),
            "unexpected": len(unexpected), "unexpected_samples": unexpected[:10],
            "good_answers_checked": len(diffs) + len(mismatches), "good_answers_equal": len(diffs),
            "good_answer_mismatches": len(mismatches), "mismatch_samples": mismatches[:3],
            "max_probability_diff": float(max(diffs)) if diffs else None,
            "good_throughput_rps": round(good_in_time[0] / args.seconds, 1),
            "good_latency_ms": {q: round(float(np.percentile(lat, p)), 1)
                                for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}}


def run_placement(artifact: Path, placement: str, args, payloads: dict, ref: Reference, logdir: Path,
                  home: Path) -> dict:
    import requests

    where, *extra = placement.split(":")
    if where not in ("in-process", "service"):
        sys.exit(f"error: placement {where!r} is not in-process or service. Fix: e.g. --placements in-process,service")
    env = {"DEPLOYKIT_MODEL_SERVICE": "1" if where == "service" else "0", "BENTOML_HOME": str(home)}
    env.update(env_pairs(args.env + extra))
    log = logdir / f"server-{where}-{int(time.time())}.log"
    with Server(artifact, env, log) as srv:
        srv.wait_ready()
        for data in payloads["good"][:20]:  # warm-up
            requests.post(f"{srv.url}/classify", files={"image": ("x.png", data, "image/png")}, timeout=30)
        meta = requests.post(f"{srv.url}/metadata", timeout=10).json()
        rss_before = tree_rss_mb(srv.proc.pid)
        with sampling(lambda: tree_rss_mb(srv.proc.pid), 0.5) as samples:
            res = asyncio.run(run_load(srv.url, args, payloads, ref))
        time.sleep(2.0)
        res["rss_mb"] = {"before": rss_before, "peak": max(samples, default=None), "after": tree_rss_mb(srv.proc.pid),
                         "samples_every_0_5s": samples}
        metrics = requests.get(f"{srv.url}/metrics", timeout=30).text
        res["metrics_bytes"] = len(metrics.encode())
        res["metrics_endpoint_labels"] = sorted({ln.split('endpoint="', 1)[1].split('"', 1)[0]
                                                for ln in metrics.splitlines() if 'endpoint="' in ln})
        srv.log.flush()
        text = Path(srv.log.name).read_text(errors="replace").splitlines()
        res["server_log"] = {"tracebacks": sum(ln.startswith("Traceback") for ln in text),
                             "model_call_retries": sum("model call dropped" in ln for ln in text),
                             "error_lines": [ln[:300] for ln in text if "[ERROR]" in ln][:10]}
    res.update({"placement": placement, "model": {k: meta["model"].get(k) for k in ("placement", "batching",
                                                                                      "max_batch_size")},
                "threads": meta["model"]["backend"].get("threads")})
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    payloads = make_payloads()
    with tempfile.TemporaryDirectory(prefix="serve-hostile-") as tmp:
        artifact = build_artifact(args, Path(tmp)).resolve()
        ref = Reference(artifact, payloads["good"])
        logs = args.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        runs = [run_placement(artifact, p.strip(), args, payloads, ref, logs, Path(tmp) / "home")
                for p in args.placements.split(",")]
    result = stamped("bench/serve_hostile.py", what="hostile load test of bentoml serve deploykit.serving:Classifier",
                     clients=args.clients, seconds=args.seconds, bad_share=args.bad_share,
                     large_share=args.large_share, server_env=args.env, loadavg_1_5_15=os.getloadavg(),
                     artifact=str(args.artifact or f"{args.checkpoint.name} compressed with {args.recipe}"),
                     runs=runs)
    result["passed"] = all(r["server_errors_5xx"] - r["by_kind"].get("large image (36 MP)", {}).get("503", 0) == 0
                           and r["connection_errors_or_timeouts"] == 0 and r["good_answer_mismatches"] == 0
                           and r["unexpected"] == 0 for r in runs)
    write_results(args.out, args.stem, result, markdown)
    return result


def markdown(r: dict) -> str:
    rows = []
    for run in r["runs"]:
        lat, rss = run["good_latency_ms"], run["rss_mb"]
        rows.append(f"| {run['placement']} | {run['requests']} | {run['server_errors_5xx']} | {run['refused_503']} | "
                    f"{run['connection_errors_or_timeouts']} | {run['unexpected']} | "
                    f"{run['good_answers_equal']}/{run['good_answers_checked']} | {run['good_throughput_rps']} | "
                    f"{lat['p50']} / {lat['p99']} / {lat['max']} | {rss['before']} / {rss['peak']} / {rss['after']} | "
                    f"{len(run['metrics_endpoint_labels'])} |")
    kinds = sorted({k for run in r["runs"] for k in run["by_kind"]})
    kind_rows = "\n".join(f"| {k} | " + " | ".join(", ".join(f"{s}: {n}" for s, n in run["by_kind"].get(k, {}).items())
                                                 for run in r["runs"]) + " |" for k in kinds)
    return f"""# Hostile serving load test ({r['created']})

Machine: {r['machine']}; load average at the end {', '.join(f'{v:.1f}' for v in r['loadavg_1_5_15'])}
(server and load generator share these cores).
Artifact: {r['artifact']}. {r['clients']} concurrent clients x {r['seconds']:.0f} s per run, {r['bad_share']:.0%} bad
requests, {r['large_share']:.1%} 36-MP PNGs; server environment: {' '.join(r['server_env']) or 'defaults'}.

| placement | requests | 5xx | of them 503 | connection errors / timeouts | unexpected status | good answers equal to the artifact | good req/s | good p50 / p99 / max ms | server RSS MB before / peak / after | metric path labels |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Status codes per kind of request:

| kind | {' | '.join(run['placement'] for run in r['runs'])} |
|---|{'---|' * len(r['runs'])}
{kind_rows}

Passed (no 5xx except 503 + Retry-After for 36-MP uploads over the decode budget, no dropped connection, every good
answer equal): **{r['passed']}**.

Reproduce: `{r['command']}`
"""


if __name__ == "__main__":
    main()
