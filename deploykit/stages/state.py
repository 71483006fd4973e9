"""The typed values stages hand each other.

A stage reads and writes these fields and nothing else of another stage: what it returns is report text
for people (``report.json``'s ``stage_facts``), never input for the next stage. So renaming a report field
cannot change what the pipeline does.

Example:
    >>> state.add_model("int8-qdq", workdir / "model.int8.onnx")   # quantize_onnx
    >>> [c.name for c in state.runtime_candidates()]                # select_runtime
    ['onnxruntime-fp32', 'onnxruntime-int8', 'openvino-fp32', 'openvino-int8', 'openvino-qdq']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..variants import ModelKind, RuntimeVariant


@dataclass
class Route:
    """One runtime variant serving the batch sizes nearest its timed one (``RuntimeChoice.by_batch``)."""

    variant: str
    backend: str
    model: str
    precision: str
    settings: dict[str, Any] = field(default_factory=dict)
    model_files: list[str] = field(default_factory=list)


@dataclass
class RuntimeChoice:
    """What the artifact ships: which backend runs which file, with which settings.

    ``model`` None means "the latest ONNX" (``model.onnx``). ``files`` maps other backends to a file they can
    run (``DEPLOYKIT_BACKEND`` overrides at serving time); ``model_files`` are the files that make up ``model``
    (an OpenVINO IR is its .xml and .bin). ``by_batch`` maps timed batch sizes to the variant measured fastest
    there when that is not one variant for all (select_runtime ``objective: per_batch``); ``backend`` / ``model``
    are then the largest size's.
    """

    backend: str = "onnxruntime"
    settings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    variant: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    model_files: list[str] = field(default_factory=list)
    by_batch: dict[int, Route] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantSettings:
    """How quantize_onnx quantized, so a later stage (accuracy_guard) re-quantizes exactly the same way."""

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = True
    op_types: tuple[str, ...] | None = None   # None: every op ONNX Runtime quantizes (the CNN default)

    def as_kwargs(self) -> dict[str, Any]:
        return {"method": self.method, "per_channel": self.per_channel, "activation_type": self.activation_type,
                "weight_type": self.weight_type, "reduce_range": self.reduce_range,
                "op_types": list(self.op_types) if self.op_types else None}


@dataclass
class RuntimeCandidate:
    """A registered runtime variant bound to the model file a stage wrote for it."""

    variant: RuntimeVariant
    path: Path

    @property
    def name(self) -> str:
        return self.variant.name

    def create(self, state: "PipelineState", threads: int | None):
        """Its runtime on its file, through the run's cache (``PipelineState.backend``)."""
        v = self.variant
        return state.backend(v.backend, self.path, threads=threads, precision=v.precision, **v.settings)


@dataclass
class StageInputs:
    """Calibration and parity-check inputs, built on first use (real images, or synthesized when data-free)."""

    calibration_fn: Callable[[], np.ndarray] | None = None
    check_fn: Callable[[], np.ndarray] | None = None
    origin: dict[str, Any] = field(default_factory=lambda: {"kind": "data"})  # how they were made (the report's)
    _calibration: np.ndarray | None = None
    _check: np.ndarray | None = None

    def calibration(self) -> np.ndarray:
        if self._calibration is None:
            self._calibration = self.calibration_fn()
        return self._calibration

    def check(self) -> np.ndarray:
        if self._check is None:
            self._check = self.check_fn()
        return self._check

    @property
    def calibration_used(self) -> int:
        """How many calibration inputs a stage asked for (0 when none did)."""
        return 0 if self._calibration is None else int(len(self._calibration))


@dataclass
class Measurements:
    """What select_runtime measured, kept so the report reuses it: each model loaded once, each number measured once.

    ``logits`` are on the evaluation images (``labels`` set) or on the held-out check inputs (``labels`` None).
    """

    backends: dict[str, Any]                     # variant name -> loaded backend (sessions, compiled models)
    logits: dict[str, np.ndarray]                # variant name -> logits, for the variants that were evaluated
    labels: np.ndarray | None
    timings: dict[int, Any]                      # batch size -> deploykit.measure.TimingRun


@dataclass
class PipelineState:
    """Everything a stage may read or replace. Data flows one way: stages never touch earlier outputs."""

    model: Any                       # the current torch.nn.Module (fused, pruned, fine-tuned...)
    teacher: Any                     # the original model, untouched: KD teacher and accuracy reference
    preprocessing: Any               # deploykit.preprocessing.Preprocessing
    workdir: Path                    # the artifact directory being built (renamed into place at the end)
    data: Any = None                 # deploykit.data.DataSplits, or None on the data-free path
    target: str = "cpu"
    onnx_path: Path | None = None        # the latest ONNX model
    onnx_fp32_path: Path | None = None   # the float ONNX every later ONNX is checked against
    precision: str = "fp32"              # what onnx_path computes in
    runtime: RuntimeChoice = field(default_factory=RuntimeChoice)
    models: dict[str, Path] = field(default_factory=dict)   # ModelKind -> file: runtime candidates come from here
    quantization: QuantSettings | None = None      # set by quantize_onnx
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model kwargs of the checkpoint's
                                                                # model: pruned files are rebuilt with them
    withheld: dict[str, str] = field(default_factory=dict)  # ModelKind -> why a stage kept its model out of the
                                                            # runtime candidates (failed its fidelity check)
    validation_indices: np.ndarray | None = None   # train images a fine-tuning stage held out (never trained on)
    inputs: StageInputs = field(default_factory=StageInputs)
    weights_changed: bool = False                  # a stage pruned or fine-tuned the float model: it no longer
                                                   # computes what the original does (the report evaluates both)
    measured: Measurements | None = None           # set by select_runtime
    tta_policy: Any = None                         # deploykit.tta_policy.TTAPolicy, set by tta_policy
    _reference_check: tuple[Path, np.ndarray] | None = None   # (onnx_fp32_path, its logits on the check inputs)
    _backends: dict = field(default_factory=dict)              # loaded runtimes, see backend()
    log: Callable[[str], None] = print

    def add_model(self, kind: ModelKind, path: Path) -> None:
        """Record a model file a stage wrote; a later stage of the same kind replaces it (e.g. the guard's)."""
        self.models[kind] = Path(path)

    def runtime_candidates(self, names: list[str] | None = None, *, bf16: bool = False) -> list[RuntimeCandidate]:
        """Every registered runtime variant whose model exists: the reference first, then simplest first (float
        before reduced precision, then by backend and name), whatever order the backend modules were imported in:
        runtime selection gives a tie to the earlier, simpler candidate.

        Args:
            names: keep only these variants (and the FP32 reference, which every score is relative to).
            bf16: include variants that need BF16 (the caller asked the CPU, or the recipe forced it).
        """
        from ..variants import REFERENCE, RUNTIME_VARIANTS

        out = []
        for name, variant in RUNTIME_VARIANTS.items():
            if variant.model not in self.models or (variant.needs == "bf16" and not bf16):
                continue
            if names is not None and name not in names and name != REFERENCE:
                continue
            out.append(RuntimeCandidate(variant, self.models[variant.model]))
        simplest = {"fp32": 0, "fp16": 1, "bf16": 1, "int8": 2}
        return sorted(out, key=lambda c: (c.name != REFERENCE, simplest.get(c.variant.precision, 3),
                                          c.variant.retrained, c.variant.backend, c.name))

    def calibration_inputs(self) -> np.ndarray:
        """Preprocessed calibration images (real, or synthesized from BN statistics when data-free)."""
        return self.inputs.calibration()

    def check_inputs(self) -> np.ndarray:
        """Inputs for parity checks: held-out real images, or held-out synthetic ones."""
        return self.inputs.check()

    def backend(self, name: str, path: Path, *, precision: str = "fp32", threads: int | None = None, **settings):
        """A runtime loaded on a model file, once per run: the stage that checks a model, select_runtime that times
        and evaluates it and the report all share the session (an OpenVINO model compiles once). Keyed by the
        file's size and modification time too, so a file written again is loaded again."""
        from ..backends import create_backend

        st = Path(path).stat()
        key = (name, str(path), st.st_size, st.st_mtime_ns, precision, threads, tuple(sorted(settings.items())))
        if key not in self._backends:
            self._backends[key] = create_backend(name, path, threads=threads, precision=precision, **settings)
        return self._backends[key]

    def reference_check_logits(self, logits: np.ndarray | None = None) -> np.ndarray:
        """The FP32 ONNX model's logits on the check inputs: every later model is checked against them, so they
        are computed once (export_onnx hands over the ones its parity check computed)."""
        path = self.onnx_fp32_path
        if logits is not None:
            self._reference_check = (path, logits)
        elif self._reference_check is None or self._reference_check[0] != path:
            from ..backends import run_batched

            self._reference_check = (path, run_batched(self.backend("onnxruntime", path).run, self.check_inputs()))
        return self._reference_check[1]
