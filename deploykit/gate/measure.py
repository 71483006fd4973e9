"""The latency gate's measurements: the reference workload, and per-round candidate/reference time ratios.

Each round times the candidate (the artifact's deployed model) and a fixed reference workload back to back
in one process, alternating which goes first (ABBA); ``deploykit.gate.stats`` decides on the ratios.

Example:
    >>> entry = measure_gate("a.deploykit", 1, model_reference("a.deploykit"), seconds=3.0)
    >>> entry["median_ratio"]
    1.003
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..measure import CLOCKS, paired_ratios as measure_ratios, with_planted_slowdown  # noqa: F401 (re-exported)


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

        from ..backends import create_backend

        self.spec = spec
        if spec["kind"] == "model":
            path = Path(spec["path"]) if base_dir is None else Path(base_dir) / spec["path"]
            self.backend = create_backend(spec["backend"], path, threads=threads,
                                          precision=spec.get("precision", "fp32"), **spec.get("settings", {}))
            self.x, self.repeats = _gate_input(batch, input_size), 1
        else:
            with tempfile.TemporaryDirectory() as tmp:
                self.backend = create_backend("onnxruntime", synthetic_reference_model(Path(tmp) / "reference.onnx"),
                                              threads=threads)
            self.x = np.random.RandomState(0).standard_normal((1, 16, 32, 32)).astype(np.float32)
            self.repeats = int(spec.get("repeats") or 1)

    def __call__(self) -> None:
        for _ in range(self.repeats):
            self.backend.run(self.x)


def model_reference(artifact, base_dir: Path | None = None) -> dict:
    """Reference spec for the artifact's deployed model, copied under ``base_dir`` (or used in place if None)."""
    import shutil

    from ..artifact import Artifact, sha256_file

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


# The gate's clocks (``deploykit.measure.CLOCKS``). 'cpu': CPU time of this process (all its threads), which a
# neighbour preempting us does not advance; on the loaded 2-core machine it shrank the bs32 A/A CI from -19%..+81%
# (wall) to -0.1%..+2.9% in the same 2 s. 'wall': elapsed time; for sub-millisecond calls it was the better one
# (bs1, 0.2 ms: median CI width 1.9% vs 4.2% for cpu, whose accounting is coarse at that scale).
# 'auto' (default) picks wall below AUTO_CLOCK_MS per model call and cpu above (docs/benchmarks.md), and 'cuda'
# (CUDA events) when the deployed runtime runs on a GPU (torch-cuda).
AUTO_CLOCK_MS = 2.0


def auto_clock(call_ms: float) -> str:
    """What 'auto' picks for calls of ``call_ms``: 'wall' below AUTO_CLOCK_MS, 'cpu' from there up."""
    return "wall" if call_ms < AUTO_CLOCK_MS else "cpu"


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
    from ..artifact import Artifact

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    backend = art.backend(threads=threads)
    x = _gate_input(batch, art.preprocessing.input_size)
    fn = with_planted_slowdown(lambda: backend.run(x), slowdown, clock)
    ref = ReferenceWorkload(reference, batch, art.preprocessing.input_size, threads, base_dir)
    reference = dict(reference)
    if clock == "auto" and getattr(backend, "on_cuda", False):  # a GPU runtime: CUDA events (measure.cuda_now)
        clock = "cuda"
    if clock == "auto":  # decided once, when a baseline is made; comparisons reuse the stored choice
        probe = measure_ratios(fn, ref, seconds=0.2, min_rounds=5, warmup_s=0.1, clock="wall")
        clock = auto_clock(_median(probe["candidate_ms"]))
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
