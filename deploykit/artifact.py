"""The artifact directory: written atomically, described by manifest.json, read by bench and serving.

Layout::

    ckpt.deploykit/
      model.onnx            the final model (what the default runtime runs)
      model.fp32.onnx       the float export every compressed model was checked against
      preprocessing.json    input size, mean/std, interpolation, class names
      recipe.yaml           the resolved recipe that produced this directory
      report.json/.md       accuracy, fidelity, latency, sizes
      manifest.json         versions, sha256 of inputs and outputs, stage lineage, runtime to use

Example:
    >>> art = Artifact.open("ckpt.deploykit")
    >>> art.backend().run(x)
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, Terminated
from .stop import stop_code

MANIFEST, PREPROCESSING, REPORT_JSON, REPORT_MD, RECIPE_YAML = (
    "manifest.json", "preprocessing.json", "report.json", "report.md", "recipe.yaml")
TTA_POLICY = "tta_policy.json"  # the test-time augmentation served by default (written by the tta_policy stage)
FINAL_MODEL, FLOAT_MODEL = "model.onnx", "model.fp32.onnx"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write text via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (numpy scalars and paths allowed)."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class ArtifactWriter:
    """Build an artifact in a hidden sibling directory; move it into place only when complete.

    On any error the half-built directory is deleted and an existing artifact is left untouched.
    With ``overwrite`` the old directory is swapped out only after the new one is complete.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.workdir: Path | None = None
        self._lock = None

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise ArtifactError(f"output directory {self.out} already exists",
                                fix="pass --overwrite to replace it, or --out to write elsewhere")
        self._lock = _lock_output(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tempdirs(self.out)
            self.workdir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as err:
            self._unlock()
            raise _write_error(self.out, err) from None
        return self.workdir

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases its flock
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._finish(exc_type, exc)
        finally:
            self._unlock()

    def _finish(self, exc_type, exc) -> bool:
        if exc_type is not None or stop_code() is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if exc_type is None:  # a stop whose exception was swallowed on the way, or never checked for
                raise Terminated(stop_code())
            if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:  # full, read-only or forbidden output disk
                raise _write_error(self.out, exc) from None
            return False
        os.chmod(self.workdir, 0o755)  # mkdtemp makes it 0700
        if self.out.exists() and not self.overwrite:  # appeared while this run was writing: keep it, say so
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise ArtifactError(f"output directory {self.out} appeared while this run was writing it",
                                fix="pass --overwrite to replace it, or --out to write elsewhere")
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.workdir, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.workdir, self.out)
        return False


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(out: Path, err: OSError) -> ArtifactError:
    return ArtifactError(f"cannot write the artifact {out}: {err.strerror or err}",
                         fix="free disk space, or pass --out on a writable disk (nothing was left behind)")


def _lock_output(out: Path):
    """An exclusive lock on the output path for the whole run, so a second run to the same --out stops at once.

    The lock file lives in the system temp directory, named after the path's hash: nothing is left beside the
    artifact, and the file is never deleted (deleting a lock file lets two runs lock two different inodes).
    """
    import fcntl

    d = Path(tempfile.gettempdir()) / "deploykit-locks"
    d.mkdir(exist_ok=True)
    f = open(d / (hashlib.sha256(str(out).encode()).hexdigest()[:32] + ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ArtifactError(f"another deploykit run is writing {out} right now",
                            fix="wait for it to finish, or pass another --out") from None
    return f


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tempdirs(out: Path) -> None:
    """Delete temp dirs left by runs that were killed (SIGKILL, power loss): their pid is gone."""
    for d in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = d.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class Artifact:
    """A finished artifact directory, opened for reading."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise ArtifactError(f"{path} is not a deploykit artifact (no {MANIFEST})",
                                fix="pass the directory written by `deploykit compress`")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{mf} is corrupt ({err})", fix="re-run `deploykit compress`") from None
        for name in manifest.get("files", {}):
            if not (path / name).is_file():
                raise ArtifactError(f"artifact {path} is incomplete: {name} is missing",
                                    fix="re-run `deploykit compress`")
        return cls(path=path, manifest=manifest)

    @property
    def preprocessing(self):
        from .preprocessing import Preprocessing

        return Preprocessing.load(self.path / PREPROCESSING)

    @property
    def runtime(self) -> dict:
        return self.manifest["runtime"]

    @property
    def report(self) -> dict:
        p = self.path / REPORT_JSON
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def tta_policy(self):
        """The TTA policy chosen at compress time (deploykit.tta_policy.TTAPolicy), or None if none was chosen."""
        p = self.path / TTA_POLICY
        if TTA_POLICY not in self.manifest.get("files", {}):  # only what compress wrote (and the manifest hashes)
            return None
        from .tta_policy import TTAPolicy

        return TTAPolicy.from_dict(json.loads(p.read_text()))

    def model_path(self, name: str | None = None) -> Path:
        return self.path / (name or self.runtime["model"])

    def default_backend(self) -> tuple[str, dict]:
        """The runtime this machine runs the artifact on, and the settings it adds: the recorded one, except that a
        ``target: gpu`` artifact runs on torch-cuda only where torch sees a GPU (else ONNX Runtime's GPU or CPU
        providers over model.onnx; ``deploykit.backends.torch_cuda_backend.gpu_artifact_backend``)."""
        rt = self.runtime
        if rt.get("target") != "gpu":
            return rt["backend"], {}
        from .backends.torch_cuda_backend import gpu_artifact_backend

        return gpu_artifact_backend(rt)

    def backend(self, name: str | None = None, threads: int | None = None, **settings: Any):
        """The artifact's model on its runtime here (``default_backend``), or on ``name`` (e.g. env DEPLOYKIT_BACKEND).

        An artifact that ships one runtime per batch size (``runtime.by_batch``) loads each and routes every batch
        by its size (``deploykit.backends.batch_router``), unless a backend or settings are named."""
        from .backends import create_backend

        rt = self.runtime
        name, chosen = name or os.environ.get("DEPLOYKIT_BACKEND"), {}
        if not name and not settings and rt.get("by_batch"):
            from .backends.batch_router import BatchRouter

            for r in rt["by_batch"].values():
                self._warn_int8_saturation(r["model"], r["precision"])
            return BatchRouter.from_routes(rt["by_batch"], lambda r, s: create_backend(
                r["backend"], self.model_path(r["model"]), threads=threads, precision=r["precision"], **s))
        if not name:
            name, chosen = self.default_backend()
        merged = {**(rt.get("settings", {}) if name == rt["backend"] else {}), **chosen, **settings}
        merged.setdefault("precision", rt.get("precision", "fp32"))
        model = rt.get("files", {}).get(name) or rt["model"]
        self._warn_int8_saturation(model, merged["precision"])
        return create_backend(name, self.model_path(model), threads=threads, **merged)

    def _warn_int8_saturation(self, model: str, precision: str) -> None:
        """Full-range INT8 weights (quantize_onnx on a VNNI CPU) lose accuracy on a CPU without VNNI, whose INT8
        kernels add pairs of products in int16 and saturate (deploykit.stages.quantize_onnx.resolve_reduce_range;
        NNCF's ``overflow_fix`` exists for the same reason in OpenVINO): say so in one line."""
        from .environment import has_int8_vnni

        quant = self.manifest.get("quantization") or {}
        if precision == "int8" and model.endswith(".onnx") and quant.get("reduce_range") is False \
                and not has_int8_vnni():
            import warnings

            warnings.warn(f"{self.path.name}: the weights of its INT8 model {model} use the full 8-bit range, chosen "
                          "on a CPU with VNNI; this CPU has none, so its INT8 kernels saturate and accuracy drops. "
                          "Fix: re-run `deploykit compress` on this machine type (or set "
                          "quantize_onnx.reduce_range: true)", RuntimeWarning, stacklevel=3)

    def verify(self, names: list[str] | None = None) -> list[str]:
        """Names of files (all, or ``names``) whose sha256 no longer matches the manifest (empty list = intact)."""
        files = self.manifest.get("files", {})
        return [n for n in (names if names is not None else files) if n in files and sha256_file(self.path / n) != files[n]]

    def served_files(self, backend: str | None = None) -> list[str]:
        """What serving reads: the model file(s) the runtime runs (an IR's .bin too) and preprocessing.json."""
        rt = self.runtime
        name = backend or self.default_backend()[0]
        models = [rt.get("files", {}).get(name) or rt["model"]]
        if backend is None and not os.environ.get("DEPLOYKIT_BACKEND"):  # what Artifact.backend() routes to
            models += [r["model"] for r in rt.get("by_batch", {}).values() if r["model"] not in models]
        files = [f for m in models for f in ([m, str(Path(m).with_suffix(".bin"))] if m.endswith(".xml") else [m])]
        return [*files, PREPROCESSING, *([TTA_POLICY] if TTA_POLICY in self.manifest.get("files", {}) else [])]

    def check_served(self, backend: str | None = None) -> "Artifact":
        """Refuse an artifact whose served files changed after it was written (labels or weights edited, a file
        truncated): serving it would answer with the wrong model or labels, silently."""
        changed = self.verify(self.served_files(backend))
        if changed:
            raise ArtifactError(f"artifact {self.path} was changed after it was written: {', '.join(changed)} "
                                f"no longer match{'es' if len(changed) == 1 else ''} manifest.json's sha256",
                                fix="re-run `deploykit compress` (or restore the original files)")
        return self


# --- what a finished compression run writes ------------------------------------------------------------------------


def finalize_model(state) -> Path:
    """The file the default runtime runs, plus ``model.onnx``: always the final model in ONNX form.

    A stage that picks the runtime by measurement (select_runtime) names its file in ``state.runtime.model``
    (e.g. an OpenVINO IR ``model.ov.xml``); otherwise the latest ONNX ships. ``model.onnx`` is a hard link to the
    chosen ONNX (or, for an IR, to the latest ONNX of the same precision), so ONNX consumers always find it and
    the per-variant files named in the manifest stay where they are.
    """
    if state.onnx_path is None:
        raise RuntimeError("recipe produced no ONNX model: it needs an export_onnx stage")
    chosen = state.runtime.model
    if chosen:
        missing = [f for f in (state.runtime.model_files or [chosen]) if not (state.workdir / f).is_file()]
        if missing:
            raise RuntimeError(f"runtime model files {missing} were not written by the recipe's stages")
    onnx_final = state.workdir / FINAL_MODEL
    source = state.workdir / chosen if chosen and chosen.endswith(".onnx") else state.onnx_path
    if source != onnx_final:
        try:
            os.link(source, onnx_final)
        except OSError:
            shutil.copyfile(source, onnx_final)
    state.onnx_path = onnx_final
    return state.workdir / chosen if chosen and not chosen.endswith(".onnx") else onnx_final


def build_manifest(checkpoint, loaded, state, final: Path, lineage: list, workdir: Path) -> dict:
    """manifest.json: versions, sha256 of every file, the source checkpoint, lineage and the runtime to use."""
    from . import __version__
    from dataclasses import asdict
    from .environment import machine, versions

    files = {p.name: sha256_file(p) for p in sorted(workdir.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "schema": 1,
        "deploykit": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(checkpoint) if checkpoint is not None else None, "sha256": loaded.sha256,
                   "arch": loaded.arch,
                   "weights": loaded.weights, "num_classes": loaded.num_classes},
        "runtime": {"backend": state.runtime.backend, "model": final.name, "precision": state.precision,
                    "settings": state.runtime.settings, "target": state.target,
                    # per-backend model files (Artifact.backend(name) / DEPLOYKIT_BACKEND) and the chosen variant
                    **{k: v for k, v in asdict(state.runtime).items() if k in ("files", "variant") and v},
                    # timed batch size -> the variant serving it (Artifact.backend() routes batches by size)
                    **({"by_batch": {str(bs): asdict(r) for bs, r in state.runtime.by_batch.items()}}
                       if state.runtime.by_batch else {})},
        # how the ONNX Runtime INT8 model was quantized: its weight range decides which CPUs run it accurately
        **({"quantization": asdict(state.quantization)} if state.quantization is not None else {}),
        "files": files,
        "lineage": [{k: s[k] for k in ("name", "config", "seconds")} for s in lineage],
        "versions": versions(),
        "machine": machine(),
    }
