"""One GPU run of the torch-cuda runtime: accuracy vs latency of the reference models, and ResNet-50 throughput.

What it measures (all on the GPU, latency from CUDA events after warm-up):

1. ``refs``: the Fashion-MNIST reference (models/resnet10t_fmnist.pth, 1x28x28) and the 64x64 Lite0 reference
   (models/efficientnet_lite0_fmnist_lt64.pth) are compressed with ``deploykit compress --target gpu`` (recipe
   gpu-fp16; its export_torch stage checks FP16/BF16 SQNR against FP32 on the GPU), then benchmarked the way
   ``deploykit bench ART --device cuda --backends torch-cuda-eager`` does: FP32 / fp16 / bf16 accuracy on the whole
   test split (10,000 images) and a latency sweep over batch 1..1024 (powers of two).
2. ``r50``: timm ResNet-50 at 224x224 with random weights: the batch with the best eager fp16 throughput (64..512),
   then at that batch eager and torch.compile + CUDA graphs, fp16 and bf16, the input already on the GPU; plus the
   end-to-end call (upload from pinned memory, download) of compile + graphs fp16. Goal: 40,000 img/s.
3. ``compiled``: the reference models again, fp16 and bf16 through torch.compile + CUDA graphs (the runtime's
   default), same sweep and accuracy; merged with (1) into one bench.json / bench.md / Pareto PNG per model.
4. ``r50-compile``: ResNet-50 through torch.compile without CUDA graphs (what the graphs add), fp16 and bf16.

Every section is skipped, with the reason recorded, when the time left (``--budget-s``) cannot hold it, and the
results are written after each section, so a run cut short still leaves what it measured.

Usage (on the GPU machine; bench/gpu/h200.sh installs the carried wheels and finds the carried data first):
    python bench/gpu/h200.py --out "$OUT"
The same logic on this CPU, tiny sizes, in well under a minute (tests/test_torch_cuda.py runs it):
    python bench/gpu/h200.py --device cpu --dry --out /tmp/h200-dry

Status: the dry mode runs here; the GPU run has NOT yet been executed (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
REFERENCES = {"resnet10t_fmnist": REPO / "models/resnet10t_fmnist.pth",
              "efficientnet_lite0_fmnist_lt64": REPO / "models/efficientnet_lite0_fmnist_lt64.pth"}
GOAL_IPS = 40_000  # ResNet-50 at 224, images per second at its best batch

# Sizes per mode. cuda: what the GPU run measures; dry: the same steps, tiny, on the CPU.
SIZES = {
    "cuda": {"eval_images": None, "check_images": 256, "max_batch": 1024, "runs": 25, "warmup": 3, "budget_s": 1.5,
             "r50_arch": "resnet50", "r50_size": 224, "r50_batches": [64, 128, 256, 512], "r50_rounds": 4,
             "eager": "torch-cuda-eager",
             "compiled": {"compile": True, "cuda_graphs": True, "dynamic": True},
             "r50_modes": {"eager": {"compile": False},
                           "compile": {"compile": True, "cuda_graphs": False, "dynamic": False},
                           "compile+graphs": {"compile": True, "cuda_graphs": True, "dynamic": False}},
             # seconds a section needs at least, else it is skipped (compiles dominate; estimates, not measured)
             "need_s": {"refs": 60, "r50_search": 20, "r50_eager": 10, "r50_compile": 75, "compiled": 90}},
    "dry": {"eval_images": 32, "check_images": 32, "max_batch": 2, "runs": 4, "warmup": 1, "budget_s": 0.3,
            "r50_arch": "resnet10t", "r50_size": 32, "r50_batches": [1, 2], "r50_rounds": 2,
            "eager": "torch-cuda-cpu",
            # dynamo traces the model, its 'eager' backend skips inductor's C++ build (minutes on a CPU)
            "compiled": {"compile": True, "cuda_graphs": False, "compile_backend": "eager", "dynamic": True},
            "r50_modes": {"eager": {"compile": False},
                          "compile": {"compile": True, "cuda_graphs": False, "compile_backend": "eager"}},
            "need_s": {"refs": 0, "r50_search": 0, "r50_eager": 0, "r50_compile": 0, "compiled": 0}},
}


class Run:
    """The result being built, the deadline, and writing it out after every section."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.t0 = time.monotonic()
        self.result: dict = {"sections": {}, "skipped": {}, "errors": {}, "seconds": {}}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def fits(self, section: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.result["skipped"][section] = f"{self.left():.0f} s left of --budget-s, {need:.0f} s needed"
        print(f"[h200] skip {section}: {self.result['skipped'][section]}", flush=True)
        return False

    def section(self, name: str, fn, *a, **kw):
        """Run one section; its error is recorded (with the traceback's tail) and the run goes on."""
        print(f"[h200] {name} ({self.left():.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            return fn(*a, **kw)
        except Exception as err:
            self.result["errors"][name] = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
            self.result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
            print(f"[h200] {name} failed: {self.result['errors'][name]}", flush=True)
            return None
        finally:
            self.result["seconds"][name] = round(time.monotonic() - start, 1)
            self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["total_seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "h200.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        (self.out / "h200.md").write_text(render_markdown(self.result))


# --- 1 and 3: the reference models --------------------------------------------------------------------------------


def build_artifact(name: str, ckpt: Path, work: Path, sizes: dict) -> dict:
    """``deploykit compress CKPT --target gpu --data fashion-mnist --no-eval``; the export_torch facts."""
    from deploykit import compress

    res = compress(ckpt, "gpu-fp16", out=work / f"{name}.deploykit", overwrite=True, data__name="fashion-mnist",
                   data__check_images=sizes["check_images"], eval__enabled=False)
    facts = res.report["stage_facts"]["export_torch"]
    return {"artifact": str(res.path), "checked_on": facts["checked_on"], "check_inputs": facts["inputs"],
            "rebuilt_fp32_max_abs_diff": facts["rebuilt_fp32"]["max_abs_logit_diff"],
            "parity": {p: {k: f[k] for k in ("sqnr_db", "min_sqnr_db", "passed", "top1_agreement")}
                       for p, f in facts["precisions"].items()}}


def eager_bench(art_path: str, sizes: dict, device: str) -> dict:
    """FP32/fp16/bf16 accuracy on the test split and the eager latency sweep: ``deploykit bench --device ...``."""
    from deploykit.benchmark import run_benchmark

    return run_benchmark(art_path, [sizes["eager"]], "auto", data="fashion-mnist", eval_images=sizes["eval_images"],
                         warmup=sizes["warmup"], runs=sizes["runs"], budget_s=sizes["budget_s"], device=device,
                         max_batch=sizes["max_batch"], log=lambda s: print(f"  {s}", flush=True))


def compiled_bench(art_path: str, sizes: dict, device: str) -> dict:
    """fp16 and bf16 through torch.compile (+ CUDA graphs on the GPU): the runtime as an artifact ships it."""
    from deploykit.artifact import Artifact
    from deploykit.backends import create_backend
    from deploykit.benchmark import BenchVariant, batch_sweep, benchmark_variants, eval_data, file_size_mb
    from deploykit.torch_model_io import TORCH_MODEL

    art = Artifact.open(art_path)
    path = art.path / TORCH_MODEL
    settings = dict(sizes["compiled"])
    mode = "compile+graphs" if settings.get("cuda_graphs") else "compile"
    variants = [BenchVariant(f"torch-cuda[{mode}]/{p}", "torch-cuda", p,
                             (lambda p=p: create_backend("torch-cuda", path, precision=p,
                                                         device="cuda" if device == "cuda" else "cpu", **settings)),
                             path.name, file_size_mb(path), group=f"{mode} {p}") for p in ("fp16", "bf16")]
    eval_set, pre = eval_data(art, "fashion-mnist", sizes["eval_images"])
    result = benchmark_variants(variants, pre, eval_set, batch_sweep(sizes["max_batch"]), warmup=sizes["warmup"],
                                runs=sizes["runs"], budget_s=sizes["budget_s"], device=device,
                                log=lambda s: print(f"  {s}", flush=True))
    result["artifact"] = {"path": str(art.path), "runtime": art.runtime}
    return result


def merge_bench(eager: dict | None, compiled: dict | None) -> dict:
    """One bench result holding the eager and the compiled variants (same sweep, same images, same machine)."""
    base = dict(eager or compiled)
    base["variants"] = [dict(v, group=f"eager {v['precision']}") for v in (eager or {}).get("variants", [])] + list(
        (compiled or {}).get("variants", []))
    base["skipped"] = (eager or {}).get("skipped", []) + (compiled or {}).get("skipped", [])
    return base


def summarize_bench(result: dict) -> list[dict]:
    """Per variant: accuracy, bs1 p50/p99, best throughput and its batch, GPU memory at that batch."""
    rows = []
    for v in result["variants"]:
        lat = {int(k[2:]): s for k, s in v["latency_ms"].items() if s}
        best = max(lat, key=lambda b: lat[b]["throughput_ips"]) if lat else None
        mem = (v.get("gpu_memory_mb") or {}).get("peak_above_load", {})
        rows.append({"variant": v["name"], "precision": v["precision"],
                     "top1": (v.get("accuracy") or {}).get("top1"), "macro_f1": (v.get("accuracy") or {}).get("macro_f1"),
                     "bs1_p50_ms": lat.get(1, {}).get("p50"), "bs1_p99_ms": lat.get(1, {}).get("p99"),
                     "best_batch": best, "best_ips": lat[best]["throughput_ips"] if best else None,
                     "best_p50_ms": lat[best]["p50"] if best else None,
                     "gpu_mb_at_best": mem.get(f"bs{best}") if best else None, "notes": v.get("notes", [])})
    return rows


# --- 2: ResNet-50 throughput -------------------------------------------------------------------------------------


def _timed_ips(fns: dict, x: np.ndarray, sizes: dict, device: str) -> dict:
    from deploykit.measure import time_variants

    run = time_variants(fns, x, max_rounds=sizes["r50_rounds"], warmup=2, eliminate=False, time_budget_s=5.0,
                        clock="cuda" if device == "cuda" else "wall")
    return {n: {"batch": len(x), **{k: r.to_dict()[k] for k in ("p50", "p99", "throughput_ips", "runs", "clock")}}
            for n, r in run.records.items()}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def r50_model(sizes: dict):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(sizes["r50_arch"], pretrained=False, num_classes=1000).eval()


def r50_search(sizes: dict, device: str) -> dict:
    """The batch with the best eager fp16 throughput (input on the device); stops at the first that does not fit."""
    from deploykit.backends import create_backend
    from deploykit.gpu import free_cached_memory, is_out_of_memory

    model, s = r50_model(sizes), sizes["r50_size"]
    be = create_backend("torch-cuda", model, precision="fp16", device=device, compile=False)
    found, stopped = {}, None
    for b in sizes["r50_batches"]:
        x = np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32)
        try:
            fn = be.resident(x)
            fn(None)
            found.update(_timed_ips({f"bs{b}": fn}, x, sizes, device))
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            free_cached_memory()
            stopped = f"out of GPU memory at batch {b}"
            break
    best = max(found.values(), key=lambda r: r["throughput_ips"])
    del be
    _free(device)
    return {"arch": sizes["r50_arch"], "input": [3, s, s], "eager_fp16_by_batch": found, "best_batch": best["batch"],
            "stopped": stopped}


def r50_config(model, mode: str, settings: dict, precision: str, batch: int, sizes: dict, device: str,
               end_to_end: bool = False) -> dict:
    """One (mode, precision) at ``batch``: build, warm up (compiles, records the graph), time on-device throughput."""
    from deploykit.backends import create_backend
    from deploykit.measure import stopwatch

    s = sizes["r50_size"]
    x = np.random.default_rng(1).standard_normal((batch, 3, s, s)).astype(np.float32)
    with stopwatch() as build:
        be = create_backend("torch-cuda", model, precision=precision, device=device, **settings)
        fn = be.resident(x)
        for _ in range(3):  # the first call compiles; with CUDA graphs the second records, the third replays
            fn(None)
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
    name = f"{mode}/{precision}"
    out = {**_timed_ips({name: fn}, x, sizes, device)[name], "mode": mode, "precision": precision,
           "build_and_warmup_s": round(build["seconds"], 1), "runtime": be.info()}
    if end_to_end:  # the whole call a server makes: float32 upload through pinned memory, model, logits back
        be.run(x)
        out["end_to_end"] = _timed_ips({"run": be.run}, x, sizes, device)["run"]
    del be, fn
    _free(device)
    return out


def r50_section(run: Run, sizes: dict, device: str, modes: tuple[str, ...]) -> None:
    """The batch search (once), then each of ``modes`` x (fp16, bf16) that the time left can hold, at that batch."""
    res = run.result["sections"].setdefault("r50", {})
    need = sizes["need_s"]
    if "best_batch" not in res:
        if not run.fits("r50_search", need["r50_search"]):
            return
        found = run.section("r50_search", r50_search, sizes, device)
        if not found:
            return
        res.update(found)
        res["configs"] = []
    model, batch = r50_model(sizes), res["best_batch"]
    for mode in [m for m in modes if m in sizes["r50_modes"]]:
        for precision in ("fp16", "bf16"):
            key = f"r50 {mode}/{precision}"
            if not run.fits(key, need["r50_eager"] if mode == "eager" else need["r50_compile"]):
                continue
            got = run.section(key, r50_config, model, mode, sizes["r50_modes"][mode], precision, batch, sizes,
                              device, end_to_end=(mode == "compile+graphs" and precision == "fp16"))
            if got:
                res["configs"].append(got)
    if res["configs"]:
        best = max(res["configs"], key=lambda c: c["throughput_ips"])
        res["best"] = {k: best[k] for k in ("mode", "precision", "batch", "throughput_ips", "p50")}
        res["goal_ips"] = GOAL_IPS
        res["goal_met"] = bool(best["throughput_ips"] >= GOAL_IPS) if device == "cuda" else None
        run.write()


# --- outputs ------------------------------------------------------------------------------------------------------


def r50_plot(res: dict, path: Path, title: str) -> Path | None:
    """Bar chart: images/s per (mode, precision) at the best batch, the goal as a line."""
    if not res.get("configs"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = res["configs"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{c['mode']}\n{c['precision']}" for c in cfgs]
    ax.bar(labels, [c["throughput_ips"] for c in cfgs], color=["#4c72b0" if c["precision"] == "fp16" else "#dd8452"
                                                                  for c in cfgs])
    if res.get("goal_met") is not None:
        ax.axhline(GOAL_IPS, color="grey", linestyle="--", linewidth=1, label=f"goal {GOAL_IPS:,} img/s")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_ylabel("images / s (input on the device)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_markdown(r: dict) -> str:
    lines = [f"# torch-cuda on {r.get('gpu_line', '?')}", "",
             f"{r.get('created', '')}, `{r.get('command', '')}`, mode **{r.get('mode', '?')}**, "
             f"{r.get('total_seconds', 0)} s. Host: {r.get('machine', '?')}.", ""]
    if r.get("mode") == "dry":
        lines += ["**Dry run on the CPU: tiny sizes, numbers mean nothing; it checks the logic only.**", ""]
    for name, ref in r["sections"].get("refs", {}).items():
        lines += [f"## {name}", ""]
        if ref.get("build"):
            b = ref["build"]
            lines += [f"Artifact `{Path(b['artifact']).name}` (recipe gpu-fp16); export_torch checks on "
                      f"{b['checked_on']} over {b['check_inputs']} held-out test images: " + ", ".join(
                          f"{p} SQNR {f['sqnr_db']:.1f} dB (bound {f['min_sqnr_db']:.0f}, "
                          f"{'pass' if f['passed'] else 'FAIL'}, top-1 agreement {f['top1_agreement']:.2f}%)"
                          for p, f in b["parity"].items()) + ".", ""]
        if ref.get("summary"):
            lines += ["| variant | top-1 % | macro-F1 % | bs1 p50 / p99 ms | best img/s (batch) | GPU MB at it |",
                      "|---|---|---|---|---|---|"]
            for s in ref["summary"]:
                f = (lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}")
                lines.append(f"| {s['variant']} | {f(s['top1'])} | {f(s['macro_f1'])} | {f(s['bs1_p50_ms'], 3)} / "
                             f"{f(s['bs1_p99_ms'], 3)} | {f(s['best_ips'], 0)} ({s['best_batch']}) | "
                             f"{f(s['gpu_mb_at_best'], 1)} |")
            lines += ["", f"Full table, sweep and Pareto plot: `{name}/bench.md`, `{name}/pareto_bs*.png`.", ""]
    r50 = r["sections"].get("r50", {})
    if r50:
        lines += [f"## {r50.get('arch', 'resnet50')} at {r50.get('input', ['?'] * 3)[-1]}, random weights", ""]
        if r50.get("eager_fp16_by_batch"):
            lines += ["Eager fp16 by batch (input on the device): " + ", ".join(
                f"{v['batch']}: {v['throughput_ips']:.0f} img/s" for v in r50["eager_fp16_by_batch"].values())
                + f"; best batch {r50.get('best_batch')}" + (f" ({r50['stopped']})" if r50.get("stopped") else "")
                + ".", ""]
        if r50.get("configs"):
            lines += ["| mode | precision | batch | img/s | p50 ms | p99 ms | build + warm-up s |",
                      "|---|---|---|---|---|---|---|"]
            for c in r50["configs"]:
                lines.append(f"| {c['mode']} | {c['precision']} | {c['batch']} | {c['throughput_ips']:.0f} | "
                             f"{c['p50']:.3f} | {c['p99']:.3f} | {c['build_and_warmup_s']} |")
                if c.get("end_to_end"):
                    e = c["end_to_end"]
                    lines.append(f"| {c['mode']}, end to end (pinned upload + download) | {c['precision']} | "
                                 f"{e['batch']} | {e['throughput_ips']:.0f} | {e['p50']:.3f} | {e['p99']:.3f} | |")
            if r50.get("best"):
                b = r50["best"]
                met = {True: "met", False: "NOT met", None: "not judged (not a GPU run)"}[r50.get("goal_met")]
                lines += ["", f"Best: {b['mode']} {b['precision']} at batch {b['batch']}: {b['throughput_ips']:.0f} "
                              f"img/s; goal {GOAL_IPS:,} img/s {met}.", ""]
    for title, key in (("Skipped (time budget)", "skipped"), ("Errors", "errors")):
        if r.get(key):
            lines += [f"## {title}", ""] + [f"- {k}: {v}" for k, v in r[key].items()] + [""]
    lines += ["Method: latency of a call from CUDA events on the current stream after warm-up (two untimed calls per "
              "batch size; with CUDA graphs the second records the graph), deploykit.measure.time_variants; "
              "accuracy on the Fashion-MNIST test split on the same device; seconds per section in h200.json.", ""]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where h200.json, h200.md and the PNGs go ($OUT on the device)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry", action="store_true", help="tiny sizes (with --device cpu: the logic check run here)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 420; dry 120)")
    ap.add_argument("--sections", default="refs,r50,compiled,r50-compile", help="which sections, in this order "
                    "(the order is the priority: what the time left cannot hold is skipped)")
    ap.add_argument("--refs", default=",".join(REFERENCES), help="which reference models (refs, compiled)")
    ap.add_argument("--work", default=None, help="where artifacts are built (default OUT/../h200-work or a tmp dir)")
    args = ap.parse_args(argv)
    mode = "dry" if args.dry else "cuda"
    if args.device == "cpu" and not args.dry:
        ap.error("--device cpu runs only with --dry (the full sizes are for a GPU)")
    args.budget_s = args.budget_s or (120.0 if args.dry else 420.0)
    sizes = SIZES[mode]

    from deploykit.environment import machine_line, versions
    from deploykit.gpu import cuda_unavailable, gpu_info, gpu_machine_line

    run = Run(args)
    if args.device == "cuda" and cuda_unavailable():
        print(f"error: {cuda_unavailable()} (run with --device cpu --dry to check the logic here)", file=sys.stderr)
        return 2
    import datetime as dt
    import tempfile

    run.result.update({"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": "python bench/gpu/h200.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "mode": mode, "device": args.device, "machine": machine_line(), "versions": versions(),
                       "gpu": gpu_info() if args.device == "cuda" else None,
                       "gpu_line": gpu_machine_line() if args.device == "cuda" else "the CPU (dry run)",
                       "budget_s": args.budget_s, "sizes": {k: v for k, v in sizes.items() if k != "need_s"}})
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="h200-work-"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    refs = run.result["sections"].setdefault("refs", {}) if {"refs", "compiled"} & set(sections) else {}
    eager: dict[str, dict] = {}
    for section in sections:
        if section == "refs":
            from deploykit.data.fashion_mnist import INSTALL_HINT, available, data_dir

            if not available():
                run.result["errors"]["refs"] = f"Fashion-MNIST not found in {data_dir()} ({INSTALL_HINT})"
                run.write()
                continue
            for name in [n.strip() for n in args.refs.split(",") if n.strip()]:
                if name not in REFERENCES:
                    ap.error(f"unknown reference {name!r}: choose from {', '.join(REFERENCES)}")
                ckpt = REFERENCES[name]
                if not run.fits(f"refs {name}", sizes["need_s"]["refs"]):
                    continue
                build = run.section(f"build {name}", build_artifact, name, ckpt, work, sizes)
                if not build:
                    continue
                refs[name] = {"build": build}
                res = run.section(f"eager {name}", eager_bench, build["artifact"], sizes, args.device)
                if res:
                    eager[name] = res
                    refs[name]["summary"] = summarize_bench(res)
                    from deploykit.benchmark import write_bench

                    write_bench(merge_bench(res, None), run.out / name)
                run.write()
        elif section in ("r50", "r50-compile"):  # r50: eager and compile + CUDA graphs; r50-compile: compile only
            r50_section(run, sizes, args.device, ("eager", "compile+graphs") if section == "r50" else ("compile",))
            r50_plot(run.result["sections"].get("r50", {}), run.out / "r50_throughput.png",
                     f"{sizes['r50_arch']} at {sizes['r50_size']}: {run.result['gpu_line']}")
        elif section == "compiled":
            for name in list(refs):
                if not run.fits(f"compiled {name}", sizes["need_s"]["compiled"]):
                    continue
                res = run.section(f"compiled {name}", compiled_bench, refs[name]["build"]["artifact"], sizes,
                                  args.device)
                if res:
                    from deploykit.benchmark import write_bench

                    merged = merge_bench(eager.get(name), res)
                    refs[name]["summary"] = summarize_bench(merged)
                    write_bench(merged, run.out / name)
                run.write()
        else:
            ap.error(f"unknown section {section!r}: choose from refs, r50, compiled, r50-compile")
    run.write()
    print((run.out / "h200.md").read_text())
    return 1 if run.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
