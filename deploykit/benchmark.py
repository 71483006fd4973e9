"""Accuracy-vs-latency benchmark of an artifact's variants (the CI latency gate is ``deploykit.gate``).

A *variant* is one model on one runtime at one precision (e.g. ``onnxruntime/int8``). ``run_benchmark``
finds the variants an artifact can offer, times them all interleaved (so load on a shared machine hits
them alike), evaluates each on the evaluation set, and returns a ``bench.json``-shaped dict;
``write_bench`` writes bench.json, bench.md and the Pareto PNG.

Which runtimes exist comes from the backend registry (``deploykit.backends.BACKENDS``): each Backend class
says where it runs (``device``), what it reads (``reads``: an nn.Module, ``.onnx``, ``.xml``), the extra
names it is benchmarked under (``bench_modes``, e.g. torch-compile) and why it cannot run here
(``unavailable``). Adding a runtime adds its variants here without a list to edit.

Example:
    >>> result = run_benchmark("ckpt.deploykit", backends=["torch", "onnxruntime"], batch_sizes=[1, 32])
    >>> write_bench(result, "bench-out")["json"]
    PosixPath('bench-out/bench.json')
"""

from __future__ import annotations

import datetime as dt
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DeployKitError

BENCH_SCHEMA = "deploykit.bench/1"


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


# --- which runtimes: read from the backend registry ---------------------------------------------------------------


@dataclass(frozen=True)
class BenchBackend:
    """A name ``--backends`` accepts: a registered backend, or one of its ``bench_modes`` (extra settings)."""

    name: str                # e.g. "openvino", "torch-compile", "onnxruntime-cuda"
    backend: str             # the registered backend it runs on
    device: str              # "cpu" or "gpu"
    settings: dict = field(default_factory=dict)
    default: bool = False    # in the default --backends: a backend's own name on the CPU (modes are opt-in)

    def unavailable(self) -> str | None:
        from .backends import BACKENDS

        return BACKENDS.get(self.backend).unavailable(**self.settings)


def bench_backends() -> dict[str, BenchBackend]:
    """Every name ``--backends`` accepts, CPU ones first (registry order), then GPU ones."""
    from .backends import BACKENDS

    found = []
    for name, cls in BACKENDS.items():
        found.append(BenchBackend(name, name, cls.device, {}, default=cls.device == "cpu"))
        for mode, settings in cls.bench_modes.items():
            device = "cpu" if settings.get("device", cls.device) == "cpu" else "gpu"
            found.append(BenchBackend(mode, name, device, dict(settings)))
    return {b.name: b for b in sorted(found, key=lambda b: b.device != "cpu")}


def known_backends() -> list[str]:
    return list(bench_backends())


def default_backends() -> list[str]:
    """The CPU backends, each under its own name (torch.compile and GPU variants are opt-in)."""
    return [b.name for b in bench_backends().values() if b.default]


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
    """'torch,onnxruntime' -> ['torch', 'onnxruntime'], checked against the registered names."""
    names = [b.strip() for b in (text.split(",") if isinstance(text, str) else text) if b.strip()]
    known = known_backends()
    bad = [b for b in names if b not in known]
    if bad or not names:
        raise BenchError(f"unknown backend {', '.join(bad) or '(none given)'}", fix=f"choose from {', '.join(known)}")
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
    from .checkpoint import load_model

    mc = _model_config(art)
    src = art.manifest.get("source", {})
    if not mc.factory:  # an artifact from before recipes recorded everything: the manifest fills the gaps
        mc = mc.model_copy(update={"arch": mc.arch or src.get("arch"),
                                   "num_classes": mc.num_classes or src.get("num_classes")})
    return load_model(path, mc)


def discover_variants(artifact, backends=None, threads: int | None = None) -> tuple[list[BenchVariant], list[dict]]:
    """The variants ``artifact`` can offer on ``backends`` (None = ``default_backends()``), and the skipped ones.

    CPU backends that take an nn.Module run the source checkpoint; CPU backends that read ONNX run the float
    export and every INT8 model in the artifact (and bf16 where a registered variant and the CPU allow);
    GPU backends run the deployed model. A backend that cannot run here is skipped with its reason.

    Example:
        >>> variants, skipped = discover_variants(Artifact.open("a.deploykit"), ["onnxruntime"])
        >>> [v.name for v in variants]
        ['onnxruntime/fp32', 'onnxruntime/int8']
    """
    from .artifact import FINAL_MODEL, FLOAT_MODEL, Artifact
    from .backends import BACKENDS
    from .torch_model_io import TORCH_MODEL

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    names = parse_backends(list(default_backends() if backends is None else backends))
    table = bench_backends()
    variants: list[BenchVariant] = []
    skipped: list[dict] = []
    fp32 = art.path / FLOAT_MODEL
    final_precision = art.runtime.get("precision", "fp32")

    def skip(name: str, reason: str) -> None:
        skipped.append({"name": name, "reason": reason})

    def runnable(b: BenchBackend, precision: str) -> bool:
        why = b.unavailable()
        if why:
            skip(f"{b.name}/{precision}", why)
        return not why

    def file_variant(b: BenchBackend, precision: str, path: Path, label: str | None = None) -> BenchVariant:
        return BenchVariant(f"{b.name}/{label or precision}", b.backend, precision,
                            lambda: _create(b.backend, path, threads, precision=precision, **b.settings), path.name,
                            file_size_mb(path))

    cpu = [table[n] for n in names if table[n].device == "cpu"]
    # CPU backends fed the source checkpoint as an nn.Module (torch; torch-compile as a mode of it)
    on_module = [b for b in cpu if "module" in BACKENDS.get(b.backend).reads and runnable(b, "fp32")]
    if on_module:
        ckpt = _source_checkpoint(art)
        if ckpt is None:
            for b in on_module:
                skip(f"{b.name}/fp32", f"source checkpoint {art.manifest.get('source', {}).get('checkpoint')!r} "
                                       "not found (the artifact stores ONNX only)")
        else:
            loaded = _load_torch_model(art, ckpt)
            module = loaded.model
            sha = art.manifest.get("source", {}).get("sha256")
            note = [] if not sha or sha == loaded.sha256 else [f"{ckpt} changed since the artifact was built"]
            size = round(sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20, 3)
            plain = {b.backend for b in on_module if not b.settings}

            def module_variant(b: BenchBackend) -> BenchVariant:
                # a mode (torch.compile) gets its own copy; same weights and (to float tolerance) numerics as
                # the plain backend, so it is evaluated once, under the plain backend's name
                return BenchVariant(f"{b.name}/fp32", b.backend, "fp32",
                                    lambda: _create(b.backend, _fresh_copy(module) if b.settings else module, threads,
                                                    **b.settings),
                                    ckpt.name, size, notes=list(note),
                                    accuracy_from=f"{b.backend}/fp32" if b.settings and b.backend in plain else None)

            # a backend's own name first: its modes reuse its accuracy
            variants += [module_variant(b) for b in sorted(on_module, key=lambda b: bool(b.settings))]
    quantized = _quantized_models(art)
    bf16_variants = _bf16_variants()
    from .environment import has_cpu_flag

    # CPU backends that read ONNX files: the float export, every INT8 model they read, bf16 where offered
    for b in cpu:
        reads = BACKENDS.get(b.backend).reads
        if ".onnx" not in reads or not runnable(b, "fp32"):
            continue
        if fp32.is_file():
            variants.append(file_variant(b, "fp32", fp32))
        else:
            skip(f"{b.name}/fp32", f"{FLOAT_MODEL} missing from the artifact")
        # a QDQ graph runs on every ONNX reader (OpenVINO runs ONNX Runtime's QDQ layers in INT8); an IR on OpenVINO
        mine = [(label, path) for label, path in quantized if path.suffix in reads]
        for label, path in mine:
            variants.append(file_variant(b, "int8", path, label))
        if not mine:
            skip(f"{b.name}/int8", "the artifact holds no INT8 model; build one with `deploykit compress --int8`")
        if b.backend not in bf16_variants:
            where = ", ".join(sorted(bf16_variants)) or "no registered backend"
            skip(f"{b.name}/bf16", f"no bf16 variant is registered for {b.backend} (bf16 runs on {where})")
        elif has_cpu_flag("avx512_bf16", "amx_bf16"):
            variants.append(file_variant(b, "bf16", fp32))
        else:
            skip(f"{b.name}/bf16", "this CPU has neither AVX512-BF16 nor AMX-BF16")
    # backends that run the artifact's torch model (model.torch.pth, target gpu: torch-cuda and its modes), at each
    # precision they offer; a mode on the same device has the plain backend's numerics: evaluated once, under it
    torch_file = art.path / TORCH_MODEL
    on_torch_file = [table[n] for n in names if Path(TORCH_MODEL).suffix in BACKENDS.get(table[n].backend).reads]
    for b in sorted(on_torch_file, key=lambda b: bool(b.settings)):
        if not runnable(b, final_precision):
            continue
        if not torch_file.is_file():
            skip(f"{b.name}/{final_precision}", f"the artifact holds no {TORCH_MODEL}; build one with "
                                                "`deploykit compress --target gpu`")
            continue
        plain = table.get(b.backend)
        same = b.settings and plain is not None and plain.name in names and plain.device == b.device
        for p in BACKENDS.get(b.backend).bench_precisions or (final_precision,):
            v = file_variant(b, p, torch_file)
            v.accuracy_from = f"{b.backend}/{p}" if same else None
            v.group = f"GPU {p}" if b.device == "gpu" else ""  # the Pareto plot colours GPU points by precision
            variants.append(v)
    deployed = (art.runtime.get("backend"), art.runtime.get("model"))
    for v in variants:  # a backend's own name, not one of its modes (other settings than the deployed ones)
        v.deployed = (v.backend, v.model_file) == deployed and v.name.split("/")[0] == v.backend
        if v.model_file == TORCH_MODEL:  # one file, several precisions: the deployed one is the recorded precision
            v.deployed = v.deployed and v.precision == final_precision
    routes = art.runtime.get("by_batch")
    if routes:  # one runtime per batch size: what ships is the router over them (Artifact.backend())
        for v in variants:
            v.deployed = False
        models = dict.fromkeys(r["model"] for r in routes.values())
        variants.append(BenchVariant(
            name="by-batch", backend="by-batch", precision="+".join(sorted({r["precision"] for r in routes.values()})),
            make=lambda: art.backend(threads=threads), model_file=art.runtime["model"], deployed=True,
            size_mb=round(sum(file_size_mb(art.path / m) for m in models), 3),
            notes=["routes: " + ", ".join(f"bs{bs} {r['variant']}" for bs, r in routes.items())]))
    # GPU backends (and GPU modes of CPU backends, e.g. onnxruntime-cuda): the deployed model, or the artifact's
    # ONNX model (always the final model in ONNX form) for a runtime that cannot read the deployed file
    for name in names:
        b = table[name]
        if b.device == "gpu" and b not in on_torch_file and runnable(b, final_precision):
            model = art.model_path()
            if model.suffix not in BACKENDS.get(b.backend).reads:
                model = art.path / FINAL_MODEL
            variants.append(file_variant(b, final_precision, model))
            variants[-1].group = f"GPU {final_precision}"
    return variants, skipped


def _bf16_variants() -> set[str]:
    """Backends with a registered bf16 runtime variant (``deploykit.variants``)."""
    from .variants import RUNTIME_VARIANTS

    return {v.backend for _, v in RUNTIME_VARIANTS.items() if v.precision == "bf16"}


def _is_qdq(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _quantized_models(art) -> list[tuple[str, Path]]:
    """(label, path) for every INT8 model in the artifact, duplicates dropped; backends pick them by suffix.

    model.onnx / model.int8.onnx: ONNX Runtime's QDQ graph ('int8'); model.<tool>.int8.onnx: another
    quantizer's QDQ graph ('int8-<tool>'); *.xml: an OpenVINO IR (NNCF) ('int8-ir').
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
            out.append(("int8-ir", p))
        elif _is_qdq(p):
            tool = [part for part in p.name.split(".")[1:-1] if part != "int8"]  # model.nncf.int8.onnx -> nncf
            out.append(("-".join(["int8", *tool]), p))
    return out


def _fresh_copy(model):
    import copy

    return copy.deepcopy(model)


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
                       skipped: list[dict] | None = None, log: Callable[[str], None] = print,
                       device: str = "cpu") -> dict:
    """Time all ``variants`` side by side per batch size, evaluate each on ``eval_set``; a bench.json dict.

    Timing is ``deploykit.measure.time_variants`` without early stopping (a benchmark reports every variant): each
    record has wall-clock p50/p90/p99, an interval on the median, the interquartile range and the process CPU time
    per call from the same runs (a neighbour preempting us does not advance CPU time, so on a shared machine it
    ranks variants more stably; it does not see waiting, and counts spinning pool threads).

    Args:
        pre: the Preprocessing that makes model inputs (shape, normalisation).
        eval_set: labelled ImageSet for accuracy; None = accuracy not measured (data-free).
        runs, warmup, budget_s: per batch size: most timed runs (rounds = runs // 5), untimed warm-up runs, seconds.
        device: 'cuda' for GPU variants: latency from CUDA events (``measure.cuda_now``), GPU memory per variant
            (weights at load, peak above that per batch size), a variant stops at the first batch size that runs
            out of GPU memory, and the machine line names the GPU, driver, CUDA and torch.
    """
    from .environment import load_average, machine, machine_line, versions
    from .evaluate import classification_metrics
    from .measure import logits_for, stopwatch, time_variants

    on_cuda = device == "cuda"
    if on_cuda:
        from . import gpu

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
        before = rss_mb()
        gpu_before = gpu.memory_mark() if on_cuda else 0
        try:
            with stopwatch() as load:
                backend = v.make()
                backend.run(x_max[:1])  # first run compiles / allocates: part of the cost of loading
            if not on_cuda:  # on a GPU the largest batch may not fit: each batch size is tried in the loop below
                backend.run(x_max)
        except Exception as err:  # a runtime that cannot take this model is reported, not fatal
            skipped.append({"name": v.name, "reason": f"failed to load/run: {type(err).__name__}: "
                                                      f"{' '.join(str(err).split())[:200]}"})
            log(f"skip {v.name}: {skipped[-1]['reason']}")
            continue
        loaded[v.name] = backend
        rows[v.name] = {"name": v.name, "backend": v.backend, "precision": v.precision, "model_file": v.model_file,
                        "size_mb": v.size_mb, "load_s": round(load["seconds"], 3), "deployed": v.deployed,
                        "group": v.group, "rss_mb": round(rss_mb() - before, 1), "runtime": backend.info(),
                        "notes": v.notes, "latency_ms": {}, "throughput_ips": {}, "accuracy": None}
        if on_cuda:  # what loading left allocated (weights, compiled graphs' buffers), then per batch size below
            rows[v.name]["gpu_memory_mb"] = {"load": gpu.memory_peak_mb(gpu_before), "peak_above_load": {}}
        log(f"loaded {v.name} in {load['seconds']:.1f}s")

    if not loaded:
        raise BenchError("no variant could be loaded", fix="check --backends and the artifact ("
                         + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) + ")")

    out_of_memory: dict[str, int] = {}  # variant -> the batch size that did not fit (larger ones are not tried)
    for bs in batch_sizes:
        x = x_max[:bs]
        fns = {}
        for name, backend in loaded.items():
            if name in out_of_memory:
                rows[name]["latency_ms"][f"bs{bs}"] = None
                continue
            try:
                mark = gpu.memory_mark() if on_cuda else 0
                backend.run(x)  # torch.compile recompiles per shape (CUDA graphs record one): keep it out of timings
                if on_cuda:
                    backend.run(x)
                    rows[name]["gpu_memory_mb"]["peak_above_load"][f"bs{bs}"] = gpu.memory_peak_mb(mark)
                fns[name] = backend.run
            except Exception as err:
                rows[name]["latency_ms"][f"bs{bs}"] = None
                if on_cuda and gpu.is_out_of_memory(err):
                    gpu.free_cached_memory()
                    out_of_memory[name] = bs
                    rows[name]["notes"].append(f"out of GPU memory at batch {bs}: larger batches not tried")
                else:
                    rows[name]["notes"].append(f"batch {bs} failed: {type(err).__name__}")
        log(f"timing batch {bs}: {len(fns)} variants side by side, up to {max(2, runs // 5)} rounds / "
            f"{budget_s:.0f}s{' (CUDA events)' if on_cuda else ''}")
        run = time_variants(fns, x, max_rounds=max(2, runs // 5), warmup=max(1, warmup), time_budget_s=budget_s,
                            eliminate=False, clock="cuda" if on_cuda else "wall")
        for name, rec in run.records.items():
            rows[name]["latency_ms"][f"bs{bs}"] = rec.to_dict()
            rows[name]["throughput_ips"][f"bs{bs}"] = round(rec.throughput, 1)
            rows[name].setdefault("cpu_ms", {})[f"bs{bs}"] = {"p50": rec.cpu_p50, "p90": rec.cpu_p90, "runs": rec.runs}

    notes: list[str] = []
    if eval_set is not None:
        by_name = {v.name: v for v in variants}
        own = {n: be for n, be in loaded.items() if by_name[n].accuracy_from not in loaded}
        log(f"evaluating {', '.join(own)} on {len(eval_set)} images")
        logits = logits_for(own, (x for x, _ in eval_set.batches(pre, eval_batch)))
        for name, lg in logits.items():
            m = classification_metrics(lg, eval_set.labels, len(pre.class_names) or int(lg.shape[1]))
            rows[name]["accuracy"] = {"top1": m["top1"], "top5": m["top5"], "macro_f1": m["macro_f1"],
                                      "images": int(len(eval_set))}
        for name in loaded.keys() - logits.keys():  # same weights and numerics as a variant evaluated above
            src = by_name[name].accuracy_from
            rows[name]["accuracy"] = {**rows[src]["accuracy"], "from": src}
    else:
        notes.append("no labelled evaluation data: accuracy not measured (pass --data)")

    threads = sorted({r["runtime"].get("threads") for r in rows.values() if r["runtime"].get("threads")})
    method = ("deploykit.measure.time_variants: variants alternate in blocks of up to 5 timed runs (one untimed run "
              "per block for calls under 100 ms), order reversed every round; p50/p90/p99, median interval and CPU "
              "time of the timed runs after warm-up")
    if on_cuda:
        method += ("; latency from CUDA events around each whole call (pinned-memory upload, model, download), "
                   "after two untimed calls per batch size (a CUDA graph is recorded on the second)")
    return {
        "schema": BENCH_SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        **({"gpu": gpu.gpu_info()} if on_cuda else {}),
        "machine": machine(),
        "machine_line": f"{gpu.gpu_machine_line()}; host {machine_line()}" if on_cuda else machine_line(),
        "load_average": load_average(),
        "versions": versions(),
        "threads": threads[0] if len(threads) == 1 else threads,
        "settings": {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs, "budget_s_per_batch": budget_s,
                     "method": method,
                     "eval_images": int(len(eval_set)) if eval_set is not None else 0,
                     "data": eval_set.name if eval_set is not None else None,
                     "input_size": list(pre.input_size)},
        "variants": list(rows.values()),
        "skipped": skipped,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "notes": notes,
    }


def check_device(device: str, backends: list[str] | None) -> list[str] | None:
    """The bench names to run on ``device`` ('cpu' or 'cuda'); raises BenchError for what cannot run there.

    On 'cuda' the default is every GPU name (``bench_backends``); a CPU name is refused, and so is a machine where
    torch sees no GPU (one line, exit 2 from the CLI).
    """
    if device == "cpu":
        return backends
    if device != "cuda":
        raise BenchError(f"--device {device!r} is not cpu or cuda", fix="use --device cpu or --device cuda")
    from .gpu import CUDA_FIX, cuda_unavailable

    why = cuda_unavailable()
    if why:
        raise BenchError(f"--device cuda: {why}", fix=f"{CUDA_FIX}, or bench on the CPU without --device cuda")
    table = bench_backends()
    names = [n for n, b in table.items() if b.device == "gpu"] if backends is None else parse_backends(backends)
    cpu = [n for n in names if table[n].device != "gpu"]
    if cpu:
        raise BenchError(f"--device cuda runs GPU backends, and {', '.join(cpu)} run on the CPU",
                         fix=f"choose from {', '.join(n for n, b in table.items() if b.device == 'gpu')}, or bench "
                             "the CPU backends in a run without --device cuda")
    return names


def batch_sweep(max_batch: int) -> list[int]:
    """Powers of two from 1 to ``max_batch``: ``--batch auto`` (a GPU variant stops at the first that does not fit).

    Example:
        >>> batch_sweep(100)
        [1, 2, 4, 8, 16, 32, 64]
    """
    if max_batch < 1:
        raise BenchError(f"--max-batch {max_batch} is not positive", fix="e.g. --max-batch 1024")
    return [2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch]


def run_benchmark(artifact, backends=None, batch_sizes=(1, 8, 32), *, data: str | None = "auto",
                  eval_images: int | None = 1000, threads: int | None = None, warmup: int = 5, runs: int = 50,
                  budget_s: float = 15.0, log: Callable[[str], None] = print, device: str = "cpu",
                  max_batch: int = 1024) -> dict:
    """Benchmark every variant ``artifact`` offers on ``backends``; returns the bench.json dict.

    Args:
        backends: bench names (``known_backends()``); None = ``default_backends()`` (on cuda: the GPU names).
        batch_sizes: a list, or 'auto' = ``batch_sweep(max_batch)``.
        data: 'auto' = the data the artifact was evaluated on; a dataset name/path; None = no accuracy.
        eval_images: evaluation images per variant (None = whole split).
        device: 'cpu', or 'cuda' (GPU variants, CUDA-event latency, GPU memory; see ``benchmark_variants``).
    """
    from .artifact import Artifact

    backends = check_device(device, backends)
    if batch_sizes == "auto":
        batch_sizes = batch_sweep(max_batch)
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    variants, skipped = discover_variants(art, backends, threads)
    for s in skipped:
        log(f"skip {s['name']}: {s['reason']}")
    eval_set, pre = eval_data(art, data, eval_images)
    result = benchmark_variants(variants, pre, eval_set, batch_sizes, warmup=warmup, runs=runs, budget_s=budget_s,
                                skipped=skipped, log=log, device=device)
    result["artifact"] = {"path": str(art.path), "runtime": art.runtime, "source": art.manifest.get("source", {})}
    return result


# --- outputs ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(result: dict) -> str:
    """bench.md: one table row per variant, the skipped list, machine and method."""
    bss = result["settings"]["batch_sizes"]
    has_cpu = any(r.get("cpu_ms") for r in result["variants"])
    has_gpu = any(r.get("gpu_memory_mb") for r in result["variants"])
    head = ["variant", "top-1 %", *[f"bs{b} p50 / p90 / p99 ms" for b in bss],
            *([f"bs{b} CPU ms p50" for b in bss] if has_cpu else []), f"bs{bss[-1]} img/s", "size MB", "RSS +MB",
            *(["GPU MB load / peak above load (largest batch)"] if has_gpu else []), "Pareto"]
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
        gpu_mb = []
        if has_gpu:
            mem = r.get("gpu_memory_mb") or {}
            peaks = mem.get("peak_above_load") or {}
            last = max(peaks, key=lambda k: int(k[2:])) if peaks else None
            gpu_mb = [f"{_fmt(mem.get('load'), 1)} / {_fmt(peaks.get(last), 1)}{f' ({last})' if last else ''}"]
        lines.append("| " + " | ".join([name, _fmt(acc), *lat, *cpu, _fmt(r["throughput_ips"].get(f"bs{bss[-1]}"), 1),
                                        _fmt(r["size_mb"]), _fmt(r["rss_mb"], 1), *gpu_mb,
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

        bss = result["settings"]["batch_sizes"]
        threads = "" if result.get("device") == "cuda" else f", {result['threads']} threads"
        for b in (bss if result.get("device", "cpu") == "cpu" else sorted({bss[0], bss[-1]})):  # a GPU sweep: ends
            pts = _points(result, b, metric)
            if len(pts) >= 1:
                paths[f"png_bs{b}"] = pareto_plot(
                    pts, out / f"pareto_bs{b}.png",
                    xlabel="CPU time per call, p50 (ms, log scale)" if metric == "cpu_p50" else
                    f"latency p50 (ms{', CUDA events' if result.get('device') == 'cuda' else ''}, log scale)",
                    title=f"{Path(result.get('artifact', {}).get('path', 'model')).name}: accuracy vs latency, batch {b}",
                    subtitle=f"{result['machine_line']}{threads}; "
                             f"top-1 on {result['settings']['eval_images']} images",
                    group_key="group" if any(p["group"] for p in pts) else None)
    return paths
