"""Selective test-time augmentation: what the policy compress chose costs (batch 1) and buys (full test split).

For each reference checkpoint, `deploykit compress --int8 --data ...` chooses the TTA policy (tta_policy stage, on
half of the evaluation split). Then, with the shipped runtime:
  * cost at batch 1: a stream of test images classified one at a time with no TTA, with the policy (one call, and
    a second for an uncertain image's extra views) and with every view in one call; timed side by side in
    alternating blocks (deploykit.measure.time_variants), reported per image and as a ratio to no TTA;
  * accuracy on the whole Fashion-MNIST test split (top-1, macro-F1, images fixed and broken vs no TTA), and the
    stage's own numbers on the half it did not choose on;
  * cost per HTTP request: the artifact served by `bentoml serve deploykit.serving:Classifier` (adaptive batching
    on), one client sending test PNGs with tta=none / policy / all in rotating order, so load hits all alike.

    .venv/bin/python bench/selective_tta.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploykit.artifact import Artifact  # noqa: E402
from deploykit.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from results_io import stamped, write_results  # noqa: E402
from deploykit.evaluate import classification_metrics  # noqa: E402
from deploykit.measure import time_variants  # noqa: E402
from deploykit.serving.tta import average_logits, make_views  # noqa: E402
from deploykit.tta_policy import apply_policy  # noqa: E402

MODELS = {"efficientnet_lite0 64x64 long-tailed": ("models/efficientnet_lite0_fmnist_lt64.pth", "fashion-mnist-lt"),
          "resnet10t reference": ("models/resnet10t_fmnist.pth", "fashion-mnist")}


def compress(ckpt: str, data: str, out: Path) -> Artifact:
    subprocess.run([str(Path(sys.executable).with_name("deploykit")), "compress", str(ROOT / ckpt), "--int8",
                    "--data", data, "--out", str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return Artifact.open(out)


def request_cost(art: Artifact, rounds: int, log: Path) -> dict:
    """p50 wall time per /classify request by TTA mode, and each mode's ratio to tta=none (rotating order)."""
    import io
    import time

    import requests
    from PIL import Image

    sys.path.insert(0, str(ROOT / "bench"))
    from serve_load import Server

    test = load_fashion_mnist("test")
    pngs = []
    for i in range(64):
        buf = io.BytesIO()
        Image.fromarray(test.images[i * 97]).save(buf, "PNG")
        pngs.append(buf.getvalue())
    modes = ("none", "policy", "all")
    ms: dict[str, list[float]] = {m: [] for m in modes}
    views: dict[str, list[int]] = {m: [] for m in modes}
    srv = Server(art.path, {}, log)
    try:
        srv.wait_ready()
        with requests.Session() as s:
            for i in range(rounds + 10):  # the first 10 rounds warm the server up and are not counted
                for m in modes[i % 3:] + modes[:i % 3]:
                    t0 = time.perf_counter()
                    r = s.post(f"{srv.url}/classify", files={"image": ("x.png", pngs[i % len(pngs)], "image/png")},
                               data={"tta": m}, timeout=30)
                    r.raise_for_status()
                    if i >= 10:
                        ms[m].append((time.perf_counter() - t0) * 1e3)
                        views[m].append(r.json()["tta_views"])
    finally:
        srv.stop()
    p50 = {m: round(float(np.median(v)), 3) for m, v in ms.items()}
    return {"rounds": rounds, "p50_ms": p50, "ratio_vs_none": {m: round(p50[m] / p50["none"], 3) for m in modes},
            "mean_views": {m: round(float(np.mean(v)), 3) for m, v in views.items()}}


def measure(label: str, art: Artifact, stream: int, rounds: int) -> dict:
    policy, backend, pre = art.tta_policy, art.backend(), art.preprocessing
    views = ("original", "hflip", "scale:0.9", "scale:1.1")
    test = load_fashion_mnist("test")
    x_all = pre.from_uint8(test.images)
    k = len(pre.class_names)

    # accuracy on the whole test split, the service's code path (tta_policy.apply_policy / make_views)
    none, used = [], []
    pol, every = [], []
    for s in range(0, len(x_all), 256):
        x = x_all[s:s + 256]
        none.append(backend.run(x))
        lg, u = apply_policy(policy, backend.run, x, make_views)
        pol.append(lg)
        used.append(u)
        every.append(average_logits(backend.run(make_views(x, views)), len(views)))
    none, pol, every, used = map(np.concatenate, (none, pol, every, used))
    base_ok = none.argmax(1) == test.labels
    acc = {}
    for name, lg in (("none", none), ("policy", pol), ("all", every)):
        m = classification_metrics(lg, test.labels, k)
        ok = lg.argmax(1) == test.labels
        acc[name] = {"top1": m["top1"], "macro_f1": m["macro_f1"], "fixed": int((ok & ~base_ok).sum()),
                     "broken": int((~ok & base_ok).sum())}
    acc["policy"]["mean_views"] = round(float(used.mean()), 4)

    # cost at batch 1 over a stream of test images, one image per call
    xs = x_all[np.random.default_rng(0).permutation(len(x_all))[:stream]]
    singles = [xs[i:i + 1] for i in range(len(xs))]
    fns = {
        "none": lambda _: [backend.run(x) for x in singles],
        "policy": lambda _: [apply_policy(policy, backend.run, x, make_views) for x in singles],
        "all": lambda _: [backend.run(make_views(x, views)) for x in singles],
    }
    run = time_variants(fns, xs, max_rounds=rounds, block_runs=1, eliminate=False)
    per_image = {n: round(r.p50 / len(xs), 4) for n, r in run.records.items()}
    return {"model": label, "runtime": art.runtime.get("variant"), "policy": policy.summary(),
            "held_out": art.report["stage_facts"]["tta_policy"].get("held_out"),
            "test_split": acc, "stream_images": len(xs),
            "cost_bs1_ms_per_image": per_image,
            "cost_ratio_vs_none": {n: round(v / per_image["none"], 3) for n, v in per_image.items()},
            "timing": {n: r.to_dict() for n, r in run.records.items()}}


def markdown(r: dict) -> str:
    lines = ["# Selective test-time augmentation: cost at batch 1 and accuracy", "",
             f"Measured {r['created']} on {r['machine']}.", "", f"Command: `{r['command']}`", ""]
    for m in r["models"]:
        p, t, c = m["policy"], m["test_split"], m["cost_ratio_vs_none"]
        lines += [f"## {m['model']} (shipped: {m['runtime']})", "", f"Policy: **{p['mode']}** {p['reason']}", "",
                  f"Cost at batch 1 ({m['stream_images']} test images, one per call, alternating blocks): policy "
                  f"**{c['policy']:.2f}x** no TTA, every view {c['all']:.2f}x "
                  f"({m['cost_bs1_ms_per_image']['none']:.3f} / {m['cost_bs1_ms_per_image']['policy']:.3f} / "
                  f"{m['cost_bs1_ms_per_image']['all']:.3f} ms per image).", "",
                  f"Per HTTP request (`bentoml serve`, adaptive batching, one client, {m['http']['rounds']} requests "
                  f"per mode in rotating order): p50 none {m['http']['p50_ms']['none']:.2f} ms, policy "
                  f"{m['http']['p50_ms']['policy']:.2f} ms (**{m['http']['ratio_vs_none']['policy']:.2f}x**, "
                  f"{m['http']['mean_views']['policy']:.2f} views per request), every view "
                  f"{m['http']['p50_ms']['all']:.2f} ms ({m['http']['ratio_vs_none']['all']:.2f}x).", "",
                  "| TTA | top-1 % (10,000 test images) | macro-F1 % | fixed vs none | broken vs none |",
                  "|---|---|---|---|---|"]
        for k in ("none", "policy", "all"):
            lines.append(f"| {k} | {t[k]['top1']:.2f} | {t[k]['macro_f1']:.2f} | {t[k]['fixed']} | {t[k]['broken']} |")
        h = m.get("held_out")
        if h:
            lines += ["", f"On the {h['images']} test images the policy was not chosen on: none {h['none']['top1']:.2f}"
                      f" / policy {h['policy']['top1']:.2f} / all {h['all']['top1']:.2f} top-1 at "
                      f"{h['policy']['mean_views']:.2f} model views per image for the policy."]
        lines.append("")
    lines.append("The policy was chosen on half of the same test split (compress evaluates there), so the whole-split "
                 "numbers include those images; the held-out line does not.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", type=int, default=256, help="test images in the batch-1 cost stream")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--http-rounds", type=int, default=200, help="requests per TTA mode through the real server")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (ckpt, data) in MODELS.items():
            art = compress(ckpt, data, Path(tmp) / f"{len(rows)}.deploykit")
            rows.append(measure(label, art, args.stream, args.rounds))
            rows[-1]["http"] = request_cost(art, args.http_rounds, Path(tmp) / f"server{len(rows)}.log")
            print(json.dumps({k: rows[-1][k] for k in ("model", "policy", "cost_ratio_vs_none")}), flush=True)
    write_results(Path(args.out), "selective_tta", stamped("bench/selective_tta.py", models=rows), markdown)


if __name__ == "__main__":
    main()
