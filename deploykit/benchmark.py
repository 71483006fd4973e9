"""Accuracy-vs-latency benchmark of an artifact's variants, and the latency-regression gate's measurements.

A *variant* is one model on one runtime at one precision (e.g. ``onnxruntime/int8``). ``run_benchmark``
finds the variants an artifact can offer, times them all interleaved (so load on a shared machine hits
them alike), evaluates each on the evaluation set, and returns a ``bench.json``-shaped dict;
``write_bench`` writes bench.json, bench.md and the Pareto PNG.

The gate half (``measure_gate``, ``make_baseline``, ``run_gate``) times the artifact's deployed model
against a fixed reference workload, round by round, and hands the ratios to ``deploykit.gate.decide``.

Example:
    >>> result = run_benchmark("ckpt.deploykit", backends=["torch", "onnxruntime"], batch_sizes=[1, 32])
    >>> write_bench(result, "bench-out")["json"]
    PosixPath('bench-out/bench.json')
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DeployKitError

BENCH_SCHEMA = "deploykit.bench/1"
BASELINE_SCHEMA = "deploykit.gate-baseline/1"
GATE_SCHEMA = "deploykit.gate-result/1"
# torch.compile is opt-in: its first compile per batch shape took minutes on the shared 2-core machine.
DEFAULT_BACKENDS = ("torch", "onnxruntime", "openvino")
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")
KNOWN_BACKENDS = ("torch", "torch-compile", "onnxruntime", "openvino") + GPU_BACKENDS


class BenchError(DeployKitError):
    """The benchmark cannot run as asked (unknown backend, bad batch list, no variant left)."""


@dataclass
class BenchVariant:
    """One model on one runtime at one precision, created lazily by ``make()``."""

    name: str
    backend: str
    precision: str
    make: Callable[[], Any]
    model_file: str
    size_mb: float
    accuracy_from: str | None = None  # evaluate once under another variant's name (same weights, same numerics)
    notes: list[str] = field(default_factory=list)
    deployed: bool = False  # the artifact's shipped model on its recorded runtime
    group: str = ""  # colour group in the Pareto plot (e.g. the prune ratio of a sweep)


# --- variants --------------------------------------------------------------------------------------------------


def file_size_mb(path: Path) -> float:
    """Size of a model file plus its weights file (ONNX external data, OpenVINO .bin), if it has one."""
    path = Path(path)
    total = path.stat().st_size
    for data in (path.with_name(path.name + ".data"), path.with_suffix(".bin")):  # ONNX external data, OpenVINO IR
        if data.is_file() and data != path:
            total += data.stat().st_size
    return round(total / 2**20, 3)


def parse_backends(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'torch,onnxruntime' -> ['torch', 'onnxruntime'], checked against the known names."""
    names = [b.strip() for b in (text.split(",") if isinstance(text, str) else text) if b.strip()]
    bad = [b for b in names if b not in KNOWN_BACKENDS]
    if bad or not names:
        raise BenchError(f"unknown backend {', '.join(bad) or '(none given)'}",
                         fix=f"choose from {', '.join(KNOWN_BACKENDS)}")
    return names


def parse_batches(text: str | list[int]) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    try:
        sizes = [int(b) for b in (text.split(",") if isinstance(text, str) else text) if str(b).strip()]
    except ValueError:
        raise BenchError(f"--batch {text!r} is not a comma-separated list of integers", fix="e.g. --batch 1,8,32") from None
    if not sizes or any(b < 1 for b in sizes):
        raise BenchError(f"--batch {text!r} needs positive batch sizes", fix="e.g. --batch 1,8,32")
    return sizes


def _has_cpu_flag(*flags: str) -> bool:
    from .environment import machine

    return any(f in machine()["cpu_flags"] for f in flags)


def gpu_available() -> tuple[bool, str]:
    """Whether a CUDA device is usable here, and why not (the hook GPU backends plug into)."""
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers() and os.path.exists("/dev/nvidia0"):
            return True, ""
    except ImportError:
        pass
    return False, "no NVIDIA GPU / CUDA execution provider on this machine"


def _gpu_variant(name: str, art) -> BenchVariant:
    """GPU variants: TensorRT / ORT-CUDA. Built by the GPU backends once they are registered."""
    from .backends import BACKENDS

    ok, why = gpu_available()
    if not ok:
        raise BenchError(why, fix="run the GPU variants on a GPU machine")
    backend = "tensorrt" if name == "tensorrt" else "onnxruntime"
    if backend not in BACKENDS:
        raise BenchError(f"backend {backend!r} is not registered in this deploykit", fix="install the GPU extra")
    path = art.model_path()
    precision = art.runtime.get("precision", "fp32")
    settings = {"device": "cuda"} if name == "onnxruntime-cuda" else {}
    return BenchVariant(f"{name}/{precision}", name, precision,
                        lambda: _create(backend, path, precision=precision, **settings), path.name, file_size_mb(path))


def _create(backend: str, model, threads: int | None = None, **settings):
    from .backends import create_backend

    return create_backend(backend, model, threads=threads, **settings)


def _source_checkpoint(art) -> Path | None:
    ckpt = art.manifest.get("source", {}).get("checkpoint")
    if not ckpt:
        return None
    for candidate in (Path(ckpt), art.path.parent / ckpt, art.path / Path(ckpt).name):
        if candidate.is_file():
            return candidate
    return None


def _model_config(art):
    """The recipe's model section only: the stage list may name stages this deploykit no longer has."""
    import yaml

    from .recipe import ModelConfig

    try:
        data = yaml.safe_load((art.path / "recipe.yaml").read_text()) or {}
        return ModelConfig.model_validate(data.get("model") or {})
    except Exception:  # a missing or foreign recipe.yaml: fall back to what the manifest says
        return ModelConfig()


def _load_torch_model(art, path: Path):
    from .checkpoint import load_checkpoint

    mc = _model_config(art)
    src = art.manifest.get("source", {})
    return load_checkpoint(path, arch=mc.arch or src.get("arch"), num_classes=mc.num_classes or src.get("num_classes"),
                           in_chans=mc.in_chans, trust_pickle=mc.trust_pickle)


def discover_variants(artifact, backends=DEFAULT_BACKENDS, threads: int | None = None
                      ) -> tuple[list[BenchVariant], list[dict]]:
    """The variants ``artifact`` can offer on ``backends``, and the ones skipped with their reason.

    Example:
        >>> variants, skipped = discover_variants(Artifact.open("a.deploykit"), ["onnxruntime"])
        >>> [v.name for v in variants]
        ['onnxruntime/fp32', 'onnxruntime/int8']
    """
    from .artifact import FLOAT_MODEL, Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    backends = parse_backends(list(backends))
    variants: list[BenchVariant] = []
    skipped: list[dict] = []
    fp32 = art.path / FLOAT_MODEL
    final_precision = art.runtime.get("precision", "fp32")

    def skip(name: str, reason: str) -> None:
        skipped.append({"name": name, "reason": reason})

    def onnx_variant(backend: str, precision: str, path: Path) -> BenchVariant:
        return BenchVariant(f"{backend}/{precision}", backend, precision,
                            lambda: _create(backend, path, threads, precision=precision), path.name, file_size_mb(path))

    torch_model = None
    if "torch" in backends or "torch-compile" in backends:
        ckpt = _source_checkpoint(art)
        if ckpt is None:
            for name in ("torch", "torch-compile"):
                if name in backends:
                    skip(f"{name}/fp32", f"source checkpoint {art.manifest.get('source', {}).get('checkpoint')!r} "
                                         "not found (the artifact stores ONNX only)")
        else:
            loaded = _load_torch_model(art, ckpt)
            torch_model = loaded.model
            sha = art.manifest.get("source", {}).get("sha256")
            note = [] if not sha or sha == loaded.sha256 else [f"{ckpt} changed since the artifact was built"]
            size = round(sum(t.numel() * t.element_size() for t in torch_model.state_dict().values()) / 2**20, 3)
            if "torch" in backends:
                variants.append(BenchVariant("torch/fp32", "torch", "fp32",
                                             lambda: _create("torch", torch_model, threads), ckpt.name, size,
                                             notes=list(note)))
            if "torch-compile" in backends:
                # same weights and (to float tolerance) same numerics as eager: evaluated once
                variants.append(BenchVariant("torch-compile/fp32", "torch", "fp32",
                                             lambda: _create("torch", _fresh_copy(torch_model), threads, compile=True),
                                             ckpt.name, size, accuracy_from="torch/fp32" if "torch" in backends else None,
                                             notes=list(note)))
    quantized = _quantized_models(art)
    for backend in ("onnxruntime", "openvino"):
        if backend not in backends:
            continue
        if fp32.is_file():
            variants.append(onnx_variant(backend, "fp32", fp32))
        else:
            skip(f"{backend}/fp32", f"{FLOAT_MODEL} missing from the artifact")
        mine = [(label, path) for label, path, runs_on in quantized if backend in runs_on]
        # OpenVINO reads ONNX Runtime's QDQ graph directly and runs the quantized layers in INT8.
        for label, path in mine:
            v = onnx_variant(backend, "int8", path)
            v.name = f"{backend}/{label}"
            variants.append(v)
        if not mine:
            skip(f"{backend}/int8", "the artifact holds no INT8 model; build one with `deploykit compress --int8`")
        if backend == "onnxruntime":
            skip("onnxruntime/bf16", "ONNX Runtime CPU has no bf16 Conv kernels (bf16 runs on OpenVINO)")
        elif _has_cpu_flag("avx512_bf16", "amx_bf16"):
            variants.append(onnx_variant("openvino", "bf16", fp32))
        else:
            skip("openvino/bf16", "this CPU has neither AVX512-BF16 nor AMX-BF16")
    deployed = (art.runtime.get("backend"), art.runtime.get("model"))
    for v in variants:
        v.deployed = (v.backend, v.model_file) == deployed
    for name in GPU_BACKENDS:
        if name in backends:
            try:
                variants.append(_gpu_variant(name, art))
            except BenchError as err:
                skip(f"{name}/{final_precision}", err.problem)
    return variants, skipped


def _is_qdq(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _quantized_models(art) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(label, path, backends that run it) for every INT8 model in the artifact, duplicates dropped.

    model.onnx / model.int8.onnx: ONNX Runtime's QDQ graph ('int8'); model.<tool>.int8.onnx: another
    quantizer's QDQ graph ('int8-<tool>'); *.xml: an OpenVINO IR (NNCF), OpenVINO only ('int8-ir').
    """
    from .artifact import FLOAT_MODEL

    hashes = art.manifest.get("files", {})
    out, seen = [], set()
    for p in sorted(art.path.iterdir(), key=lambda q: (q.name != "model.onnx", q.name)):
        if p.name.startswith(".") or p.name == FLOAT_MODEL or p.suffix not in (".onnx", ".xml"):
            continue
        digest = hashes.get(p.name) or (p.stat().st_ino, p.stat().st_dev)
        if digest in seen:
            continue
        seen.add(digest)
        if p.suffix == ".xml":
            out.append(("int8-ir", p, ("openvino",)))
        elif _is_qdq(p):
            tool = [part for part in p.name.split(".")[1:-1] if part != "int8"]  # model.nncf.int8.onnx -> nncf
            out.append(("-".join(["int8", *tool]), p, ("onnxruntime", "openvino")))
    return out


def _fresh_copy(model):
    import copy

    return copy.deepcopy(model)


def final_variant(artifact, name: str | None = None, threads: int | None = None) -> BenchVariant:
    """The artifact's deployed model on its recorded runtime (what `deploykit serve` would run).

    Example:
        >>> v = final_variant("int8.deploykit", name="int8")
    """
    from .artifact import Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    rt = art.runtime
    path = art.model_path()
    precision = rt.get("precision", "fp32")
    return BenchVariant(name or f"{rt['backend']}/{precision}", rt["backend"], precision,
                        lambda: art.backend(threads=threads), path.name, file_size_mb(path))


# --- measuring -------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def eval_data(art, data: str | None, eval_images: int | None, seed: int = 0):
    """(ImageSet, Preprocessing) for accuracy, or (None, pre) when there is no labelled data."""
    from .data import resolve_data
    from .recipe import DataConfig

    pre = art.preprocessing
    if data == "auto":
        data = art.report.get("data", {}).get("name")
    if not data:
        return None, pre
    splits = resolve_data(DataConfig(name=data, eval_images=eval_images, calibration_images=1, seed=seed))
    return splits.eval, pre


def benchmark_variants(variants: list[BenchVariant], pre, eval_set=None, batch_sizes=(1, 8, 32), *,
                       warmup: int = 5, runs: int = 50, budget_s: float = 15.0, eval_batch: int = 64,
                       skipped: list[dict] | None = None, cpu_time: bool = True,
                       log: Callable[[str], None] = print) -> dict:
    """Time all ``variants`` interleaved per batch size, evaluate each on ``eval_set``; a bench.json dict.

    Besides wall-clock latency, ``cpu_time`` records the process CPU time per call (p50 of interleaved
    rounds): a neighbour preempting us does not advance it, so on a shared machine it ranks variants
    far more stably than wall time (it does not see waiting, and counts spinning pool threads).

    Args:
        pre: the Preprocessing that makes model inputs (shape, normalisation).
        eval_set: labelled ImageSet for accuracy; None = accuracy not measured (data-free).
        runs, warmup, budget_s: per batch size, passed to ``timing.measure_in_blocks`` (rounds = runs // 5).
    """
    from .environment import machine, machine_line, versions
    from .evaluate import classification_metrics, predict
    from .timing import measure_in_blocks

    skipped = list(skipped or [])
    batch_sizes = parse_batches(list(batch_sizes))
    if eval_set is not None:
        sample = eval_set.head(max(batch_sizes), seed=1).load(pre, np.arange(min(len(eval_set), max(batch_sizes))))
    else:
        sample = np.random.default_rng(0).standard_normal((max(batch_sizes), *pre.input_size)).astype(np.float32)
    x_max = np.resize(sample, (max(batch_sizes), *sample.shape[1:])).astype(np.float32)

    loaded: dict[str, Any] = {}
    rows: dict[str, dict] = {}
    for v in variants:
        gc.collect()
        before, t0 = rss_mb(), time.perf_counter()
        try:
            backend = v.make()
            backend.run(x_max[:1])  # first run compiles / allocates: part of the cost of loading
            load_s = time.perf_counter() - t0
            backend.run(x_max)
        except Exception as err:  # a runtime that cannot take this model is reported, not fatal
            skipped.append({"name": v.name, "reason": f"failed to load/run: {type(err).__name__}: "
                                                      f"{' '.join(str(err).split())[:200]}"})
            log(f"skip {v.name}: {skipped[-1]['reason']}")
            continue
        loaded[v.name] = backend
        rows[v.name] = {"name": v.name, "backend": v.backend, "precision": v.precision, "model_file": v.model_file,
                        "size_mb": v.size_mb, "load_s": round(load_s, 3), "deployed": v.deployed, "group": v.group,
                        "rss_mb": round(rss_mb() - before, 1), "runtime": backend.info(), "notes": v.notes,
                        "latency_ms": {}, "throughput_ips": {}, "accuracy": None}
        log(f"loaded {v.name} in {load_s:.1f}s")

    if not loaded:
        raise BenchError("no variant could be loaded", fix="check --backends and the artifact ("
                         + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) + ")")

    for bs in batch_sizes:
        x = x_max[:bs]
        fns = {}
        for name, backend in loaded.items():
            try:
                backend.run(x)  # torch.compile recompiles per shape: keep that out of the timings
                fns[name] = backend.run
            except Exception as err:
                rows[name]["latency_ms"][f"bs{bs}"] = None
                rows[name]["notes"].append(f"batch {bs} failed: {type(err).__name__}")
        log(f"timing batch {bs}: {len(fns)} variants interleaved, up to {runs} rounds / {budget_s:.0f}s")
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        # blocks, not run-by-run: a runtime's thread pool spins after each call and slows the next runtime
        stats = measure_in_blocks(fns, x, rounds=max(2, runs // 5), block_runs=5, warmup=1, time_budget_s=budget_s)
        for name, s in stats.items():
            rows[name]["latency_ms"][f"bs{bs}"] = {"p50": s.p50, "p90": s.p90, "p99": s.p99, "mean": s.mean,
                                                   "min": s.min, "runs": s.runs}
            rows[name]["throughput_ips"][f"bs{bs}"] = round(s.throughput, 1)
        if cpu_time:
            for name, v in measure_cpu_interleaved(fns, x, runs=runs, budget_s=budget_s).items():
                rows[name].setdefault("cpu_ms", {})[f"bs{bs}"] = v

    notes: list[str] = []
    if eval_set is not None:
        by_name = {v.name: v for v in variants}
        for name, backend in loaded.items():
            src = by_name[name].accuracy_from
            if src and src in rows and rows[src]["accuracy"] is not None:
                rows[name]["accuracy"] = {**rows[src]["accuracy"], "from": src}
                continue
            log(f"evaluating {name} on {len(eval_set)} images")
            logits = predict(backend, eval_set, pre, eval_batch)
            m = classification_metrics(logits, eval_set.labels, len(pre.class_names) or int(logits.shape[1]))
            rows[name]["accuracy"] = {"top1": m["top1"], "top5": m["top5"], "macro_f1": m["macro_f1"],
                                      "images": int(len(eval_set))}
    else:
        notes.append("no labelled evaluation data: accuracy not measured (pass --data)")

    threads = sorted({r["runtime"].get("threads") for r in rows.values() if r["runtime"].get("threads")})
    return {
        "schema": BENCH_SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_line": machine_line(),
        "load_average": _loadavg(),
        "versions": versions(),
        "threads": threads[0] if len(threads) == 1 else threads,
        "settings": {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs, "budget_s_per_batch": budget_s,
                     "method": "timing.measure_in_blocks: variants alternate in blocks of 5 timed runs (one untimed "
                               "run per block), order reversed every round; p50/p90/p99 of the timed runs after "
                               "warm-up",
                     "eval_images": int(len(eval_set)) if eval_set is not None else 0,
                     "data": eval_set.name if eval_set is not None else None,
                     "input_size": list(pre.input_size)},
        "variants": list(rows.values()),
        "skipped": skipped,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "notes": notes,
    }


def measure_cpu_interleaved(fns: dict[str, Callable], x: np.ndarray, runs: int = 30, budget_s: float = 15.0,
                            warmup: int = 2) -> dict[str, dict]:
    """Process CPU ms per call for each variant, alternating variants round by round (order reversed each round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(runs):
        order = list(fns.items())[::(-1 if i % 2 else 1)]
        for name, fn in order:
            t0 = time.process_time()
            fn(x)
            samples[name].append((time.process_time() - t0) * 1000.0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: {"p50": round(float(np.median(v)), 4), "p90": round(float(np.percentile(v, 90)), 4), "runs": len(v)}
            for k, v in samples.items()}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(artifact, backends=DEFAULT_BACKENDS, batch_sizes=(1, 8, 32), *, data: str | None = "auto",
                  eval_images: int | None = 1000, threads: int | None = None, warmup: int = 5, runs: int = 50,
                  budget_s: float = 15.0, log: Callable[[str], None] = print) -> dict:
    """Benchmark every variant ``artifact`` offers on ``backends``; returns the bench.json dict.

    Args:
        data: 'auto' = the data the artifact was evaluated on; a dataset name/path; None = no accuracy.
        eval_images: evaluation images per variant (None = whole split).
    """
    from .artifact import Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    variants, skipped = discover_variants(art, backends, threads)
    for s in skipped:
        log(f"skip {s['name']}: {s['reason']}")
    eval_set, pre = eval_data(art, data, eval_images)
    result = benchmark_variants(variants, pre, eval_set, batch_sizes, warmup=warmup, runs=runs, budget_s=budget_s,
                                skipped=skipped, log=log)
    result["artifact"] = {"path": str(art.path), "runtime": art.runtime, "source": art.manifest.get("source", {})}
    return result


# --- outputs ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(result: dict) -> str:
    """bench.md: one table row per variant, the skipped list, machine and method."""
    bss = result["settings"]["batch_sizes"]
    has_cpu = any(r.get("cpu_ms") for r in result["variants"])
    head = ["variant", "top-1 %", *[f"bs{b} p50 / p90 / p99 ms" for b in bss],
            *([f"bs{b} CPU ms p50" for b in bss] if has_cpu else []), f"bs{bss[-1]} img/s", "size MB", "RSS +MB",
            "Pareto"]
    front = set(pareto_names(result, bss[0], result.get("plot_metric", "p50")))
    lines = [f"# deploykit bench: {result.get('artifact', {}).get('path', '')}", "",
             f"Measured {result['created']} on {result['machine_line']}, {result['threads']} threads, "
             f"load average {result.get('load_average')}. Accuracy on {result['settings']['eval_images']} images of "
             f"`{result['settings']['data']}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["variants"]:
        lat = []
        for b in bss:
            s = r["latency_ms"].get(f"bs{b}")
            lat.append(f"{s['p50']:.2f} / {s['p90']:.2f} / {s['p99']:.2f}" if s else "n/a")
        acc = r["accuracy"]["top1"] if r.get("accuracy") else None
        cpu = [_fmt((r.get("cpu_ms") or {}).get(f"bs{b}", {}).get("p50"), 3) for b in bss] if has_cpu else []
        name = f"{r['name']} (deployed)" if r.get("deployed") else r["name"]
        lines.append("| " + " | ".join([name, _fmt(acc), *lat, *cpu, _fmt(r["throughput_ips"].get(f"bs{bss[-1]}"), 1),
                                        _fmt(r["size_mb"]), _fmt(r["rss_mb"], 1),
                                        "yes" if r["name"] in front else ""]) + " |")
    if result.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- `{s['name']}`: {s['reason']}" for s in result["skipped"]]
    lines += ["", f"Method: {result['settings']['method']}. Up to {result['settings']['runs']} timed rounds after "
              f"{result['settings']['warmup']} warm-up rounds, capped at {result['settings']['budget_s_per_batch']} s per "
              "batch size. RSS +MB = resident memory added by loading the variant and running the largest batch; "
              f"process peak RSS {result['peak_rss_mb']} MB. Pareto = not beaten on both accuracy and bs{bss[0]} "
              f"{'CPU time' if result.get('plot_metric') == 'cpu_p50' else 'p50 latency'} by another variant."]
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def pareto_names(result: dict, batch: int, metric: str = "p50") -> list[str]:
    """Variants on the accuracy-vs-latency Pareto front at ``batch`` (fastest first)."""
    from .plots import pareto_front

    pts = _points(result, batch, metric)
    return [pts[i]["name"] for i in pareto_front([(p["latency_ms"], p["accuracy"]) for p in pts])]


def _points(result: dict, batch: int, metric: str = "p50") -> list[dict]:
    """metric 'p50' = wall-clock median latency; 'cpu_p50' = median process CPU time per call."""
    pts = []
    for r in result["variants"]:
        s = (r.get("cpu_ms") or {}).get(f"bs{batch}") if metric == "cpu_p50" else r["latency_ms"].get(f"bs{batch}")
        if s and r.get("accuracy"):
            # in a grouped plot the colour names the group, so the label drops the group's name prefix
            label = r["name"].split(" ", 1)[-1] if r.get("group") else r["name"]
            pts.append({"name": r["name"], "label": label, "latency_ms": s["p50"], "accuracy": r["accuracy"]["top1"],
                        "group": r.get("group", "")})
    return pts


def write_bench(result: dict, out: str | Path, plot: bool = True, metric: str = "p50") -> dict[str, Path]:
    """Write bench.json, bench.md and pareto_bs<B>.png (one per batch size) into ``out``; returns the paths.

    Args:
        metric: x axis of the plot, 'p50' (wall-clock latency) or 'cpu_p50' (CPU time per call: the
            stable choice on a loaded shared machine).
    """
    from .artifact import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["plot_metric"] = metric
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    write_json(paths["json"], result)
    tmp = out / ".bench.md.tmp"
    tmp.write_text(render_markdown(result))
    os.replace(tmp, paths["md"])
    if plot:
        from .plots import pareto_plot

        for b in result["settings"]["batch_sizes"]:
            pts = _points(result, b, metric)
            if len(pts) >= 1:
                paths[f"png_bs{b}"] = pareto_plot(
                    pts, out / f"pareto_bs{b}.png",
                    xlabel="CPU time per call, p50 (ms, log scale)" if metric == "cpu_p50" else
                    "latency p50 (ms, log scale)",
                    title=f"{Path(result.get('artifact', {}).get('path', 'model')).name}: accuracy vs latency, batch {b}",
                    subtitle=f"{result['machine_line']}, {result['threads']} threads; "
                             f"top-1 on {result['settings']['eval_images']} images",
                    group_key="group" if any(p["group"] for p in pts) else None)
    return paths


# --- the gate's measurements -------------------------------------------------------------------------------------


def synthetic_reference_model(path: Path) -> Path:
    """Write the synthetic reference workload: a small seeded conv net (the same bytes on every machine)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(1234)
    w1 = numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "deploykit_gate_reference",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 32, 32])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def _model_files(path: Path) -> list[Path]:
    """A model file and the weights files it needs (ONNX external data, OpenVINO .bin)."""
    extra = [path.with_name(path.name + ".data"), path.with_suffix(".bin")]
    return [path] + [p for p in extra if p.is_file() and p != path]


def _gate_input(batch: int, input_size) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)


class ReferenceWorkload:
    """The fixed workload each candidate call is timed against, round by round.

    kind 'model' (default): the baseline's own deployed model, copied next to the baseline JSON and run on
    the same runtime, settings and input as the candidate. Load from neighbours then hits both sides
    alike, so the A/A ratio stays within ~1-2% even when the machine is busy; it cannot see a slowdown of
    the runtime library itself (both sides run it), only of the model.
    kind 'synthetic': a seeded conv net on ONNX Runtime, ``repeats`` calls per round. Needs no stored
    model, and does see runtime regressions, but neighbours' load shifts its ratio by 10-20% here.
    """

    def __init__(self, spec: dict, batch: int, input_size, threads: int, base_dir: Path | None = None):
        import tempfile

        self.spec = spec
        if spec["kind"] == "model":
            path = Path(spec["path"]) if base_dir is None else Path(base_dir) / spec["path"]
            self.backend = _create(spec["backend"], path, threads, precision=spec.get("precision", "fp32"),
                                   **spec.get("settings", {}))
            self.x, self.repeats = _gate_input(batch, input_size), 1
        else:
            with tempfile.TemporaryDirectory() as tmp:
                self.backend = _create("onnxruntime", synthetic_reference_model(Path(tmp) / "reference.onnx"), threads)
            self.x = np.random.RandomState(0).standard_normal((1, 16, 32, 32)).astype(np.float32)
            self.repeats = int(spec.get("repeats") or 1)

    def __call__(self) -> None:
        for _ in range(self.repeats):
            self.backend.run(self.x)


def model_reference(artifact, base_dir: Path | None = None) -> dict:
    """Reference spec for the artifact's deployed model, copied under ``base_dir`` (or used in place if None)."""
    import shutil

    from .artifact import Artifact, sha256_file

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    rt = art.runtime
    model = art.model_path()
    spec = {"kind": "model", "backend": rt["backend"], "precision": rt.get("precision", "fp32"),
            "settings": {k: v for k, v in rt.get("settings", {}).items() if k != "precision"},
            "model": model.name, "sha256": sha256_file(model)}
    if base_dir is None:
        return {**spec, "path": str(model.absolute())}
    base_dir.mkdir(parents=True, exist_ok=True)
    for f in _model_files(model):
        tmp = base_dir / f".{f.name}.tmp"
        shutil.copyfile(f, tmp)
        os.replace(tmp, base_dir / f.name)
    return {**spec, "path": f"{base_dir.name}/{model.name}"}


# The gate's clocks. 'cpu': CPU time of this process (all its threads), which a neighbour preempting us
# does not advance; on the loaded 2-core machine it shrank the bs32 A/A CI from -19%..+81% (wall) to
# -0.1%..+2.9% in the same 2 s. 'wall': elapsed time; for sub-millisecond calls it was the better one
# (bs1, 0.2 ms: median CI width 1.9% vs 4.2% for cpu, whose accounting is coarse at that scale).
# 'auto' (default) picks wall below AUTO_CLOCK_MS per model call and cpu above (docs/benchmarks.md).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
AUTO_CLOCK_MS = 2.0


def with_planted_slowdown(fn: Callable[[], Any], fraction: float, clock: str = "cpu") -> Callable[[], Any]:
    """``fn`` made ``fraction`` slower: after each call, spin for ``fraction`` x that call's own time.

    The spin is measured on the gate's ``clock``, so the planted cost is exact in the unit the gate
    measures and scales with load like the model does. Used by bench/gate_proof.py.
    """
    if fraction <= 0:
        return fn
    now = CLOCKS[clock]

    def slowed():
        t0 = now()
        out = fn()
        end = now() + fraction * (now() - t0)
        while now() < end:
            pass
        return out

    return slowed


def measure_ratios(candidate: Callable[[], Any], reference: Callable[[], Any], seconds: float = 3.0,
                   min_rounds: int = 30, max_rounds: int = 20000, warmup: int = 5, warmup_s: float = 0.3,
                   clock: str = "cpu") -> dict:
    """Alternate candidate and reference calls (ABBA order) for ``seconds`` (wall); per-round time ratios.

    Each call is timed on ``clock`` ('cpu' = process CPU time, 'wall' = elapsed; see CLOCKS).

    Warm-up runs at least ``warmup`` rounds and ``warmup_s`` seconds: the first fraction of a second after
    creating a session ran measurably faster or slower than the rest (allocator, caches, clocks).

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
    clock = CLOCKS[clock]
    start = wall()
    i = 0
    while i < max_rounds and (i < min_rounds or wall() - start < seconds):
        if i % 2 == 0:
            t0 = clock(); candidate(); t1 = clock(); reference(); t2 = clock()  # noqa: E702
            c, r = t1 - t0, t2 - t1
        else:
            t0 = clock(); reference(); t1 = clock(); candidate(); t2 = clock()  # noqa: E702
            r, c = t1 - t0, t2 - t1
        cand_ms.append(c * 1000.0)
        ref_ms.append(r * 1000.0)
        i += 1
    return {"ratios": [c / r for c, r in zip(cand_ms, ref_ms)], "candidate_ms": cand_ms, "reference_ms": ref_ms,
            "rounds": i, "seconds": round(wall() - start, 3)}


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def measure_gate(artifact, batch: int, reference: dict, *, threads: int = 1, seconds: float = 3.0,
                 base_dir: Path | None = None, slowdown: float = 0.0, min_rounds: int = 30, clock: str = "auto") -> dict:
    """Per-round ratios of the artifact's deployed model vs the reference workload at one batch size.

    Args:
        reference: a spec from ``model_reference`` or ``{"kind": "synthetic", "repeats": None}`` (None = pick
            repeats so the reference takes about as long as the model; stored, then reused by every comparison).
        slowdown: plant an artificial slowdown (bench/gate_proof.py only).
    Returns:
        One baseline entry: key, batch, reference spec, ratios, rounds, medians.
    """
    from .artifact import Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    backend = art.backend(threads=threads)
    x = _gate_input(batch, art.preprocessing.input_size)
    fn = with_planted_slowdown(lambda: backend.run(x), slowdown, clock)
    ref = ReferenceWorkload(reference, batch, art.preprocessing.input_size, threads, base_dir)
    reference = dict(reference)
    if clock == "auto":  # decided once, when a baseline is made; comparisons reuse the stored choice
        probe = measure_ratios(fn, ref, seconds=0.2, min_rounds=5, warmup_s=0.1, clock="wall")
        clock = "wall" if _median(probe["candidate_ms"]) < AUTO_CLOCK_MS else "cpu"
    if reference["kind"] == "synthetic" and not reference.get("repeats"):
        probe = measure_ratios(fn, ref, seconds=0.3, min_rounds=10, warmup_s=0.1, clock=clock)
        ref.repeats = reference["repeats"] = max(1, int(round(_median(probe["ratios"]))))
    m = measure_ratios(fn, ref, seconds=seconds, min_rounds=min_rounds, clock=clock)
    rt = art.runtime
    return {"key": f"{rt['backend']}/{rt.get('precision', 'fp32')}/bs{batch}", "batch": batch,
            "backend": rt["backend"], "precision": rt.get("precision", "fp32"), "model": rt["model"],
            "threads": threads, "clock": clock, "reference": reference,
            "ratios": [round(r, 6) for r in m["ratios"]], "rounds": m["rounds"], "seconds": m["seconds"],
            "median_ratio": round(_median(m["ratios"]), 6),
            "candidate_ms_p50": round(_median(m["candidate_ms"]), 4),
            "reference_ms_p50": round(_median(m["reference_ms"]), 4)}


def make_baseline(artifact, path: str | Path, batch_sizes=(1,), *, threads: int = 1, seconds: float = 3.0,
                  reference: str = "model", clock: str = "auto") -> dict:
    """Measure a new gate baseline for the artifact's deployed model and write it (--update-baseline).

    With reference 'model' the deployed model is copied to ``<baseline stem>.reference/`` beside the JSON.
    """
    from .artifact import Artifact, write_json
    from .environment import machine, versions

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if reference == "model":
        spec = model_reference(art, path.parent / f"{path.stem}.reference")
    elif reference == "synthetic":
        spec = {"kind": "synthetic", "repeats": None}
    else:
        raise BenchError(f"unknown gate reference {reference!r}", fix="use --gate-reference model or synthetic")
    if clock not in (*CLOCKS, "auto"):
        raise BenchError(f"unknown gate clock {clock!r}", fix="use --gate-clock auto, cpu or wall")
    entries = [measure_gate(art, b, spec, threads=threads, seconds=seconds, base_dir=path.parent, clock=clock)
               for b in parse_batches(list(batch_sizes))]
    data = {"schema": BASELINE_SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "artifact": {"path": str(art.path), "model": art.runtime["model"],
                         "sha256": art.manifest.get("files", {}).get(art.runtime["model"])},
            "machine": machine(), "versions": versions(), "load_average": _loadavg(),
            "settings": {"threads": threads, "seconds": seconds, "reference": reference, "clock": clock},
            "entries": entries}
    write_json(path, data)
    return data


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline JSON written by ``make_baseline`` (and its reference model, if any)."""
    import json

    from .artifact import sha256_file
    from .gate import GateError

    path = Path(path)
    fix = "re-create it with --update-baseline"
    if not path.is_file():
        raise GateError(f"baseline {path} not found", fix="create it with --baseline FILE --update-baseline")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GateError(f"baseline {path} is not valid JSON ({err.msg})", fix=fix) from None
    if data.get("schema") != BASELINE_SCHEMA or not data.get("entries"):
        raise GateError(f"{path} is not a deploykit gate baseline (schema {data.get('schema')!r})", fix=fix)
    for e in data["entries"]:
        ref = e.get("reference", {})
        if ref.get("kind") == "model":
            model = path.parent / ref["path"]
            if not model.is_file():
                raise GateError(f"the baseline's reference model {model} is missing", fix=f"commit it, or {fix}")
            if sha256_file(model) != ref.get("sha256"):
                raise GateError(f"the baseline's reference model {model} changed since the baseline was made", fix=fix)
    return data


def run_gate(artifact, baseline: dict, max_slowdown: float, *, base_dir: str | Path = ".",
             seconds: float | None = None, slowdown: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Measure the artifact against every baseline entry and decide; returns the gate-result dict.

    Args:
        base_dir: the directory of the baseline JSON (its reference model paths are relative to it).
        slowdown: plants an artificial slowdown (bench/gate_proof.py only).
    """
    from .artifact import Artifact
    from .environment import machine
    from .gate import combine, decide

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    warnings = []
    here, there = machine(), baseline.get("machine", {})
    if there and (here.get("cpu"), here.get("cpu_flags")) != (there.get("cpu"), there.get("cpu_flags")):
        warnings.append(f"baseline measured on '{there.get('cpu')}' {there.get('cpu_flags')}, this is '{here.get('cpu')}'"
                        f" {here.get('cpu_flags')}: re-create the baseline on the CI machine type")
    seconds = seconds if seconds is not None else float(baseline.get("settings", {}).get("seconds", 3.0))
    decisions, measured = [], []
    for entry in baseline["entries"]:
        m = measure_gate(art, int(entry["batch"]), entry["reference"], threads=int(entry.get("threads", 1)),
                         seconds=seconds, base_dir=Path(base_dir), slowdown=slowdown, clock=entry.get("clock", "wall"))
        if m["key"] != entry["key"]:
            warnings.append(f"baseline entry {entry['key']} compared with {m['key']} (the deployed runtime changed)")
        d = decide(m["ratios"], entry["ratios"], max_slowdown, key=entry["key"])
        decisions.append(d)
        measured.append({k: v for k, v in m.items() if k != "ratios"})
        log(d.summary())
    for w in warnings:
        log(f"warning: {w}")
    code = combine(decisions)
    return {"schema": GATE_SCHEMA, "exit_code": code, "verdict": {0: "pass", 1: "regression", 2: "undecided"}[code],
            "max_slowdown": max_slowdown, "decisions": [d.to_dict() for d in decisions], "measured": measured,
            "warnings": warnings, "load_average": _loadavg(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
