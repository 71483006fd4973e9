"""What this machine can run: CPU features, runtimes, GPU stack; for each missing piece, why and how to get it.

Every check imports its library inside a try block and reports what actually happened here (an
installed-but-broken package is reported as broken, with the error), never what "should" be there.
A runtime's checks live in its backend module (``Backend.doctor_checks``, read from ``BACKENDS``); the
ones here are about the machine and the non-runtime tools (modelopt, BentoML).

Example:
    >>> for c in run_checks(): print(c.name, c.ok, c.version, c.detail)
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class Check:
    """One line of `deploykit doctor`: a component, whether it is usable, and what to do if not."""

    name: str
    ok: bool
    version: str | None = None
    detail: str = ""
    why: str = ""      # only when not ok: what is missing or broken
    fix: str = ""      # only when not ok: how to get it
    extra: dict = field(default_factory=dict)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_cpu() -> Check:
    from .environment import CPU_FLAGS, has_int8_vnni, machine

    m = machine()
    flags = m["cpu_flags"]
    notes = []
    if has_int8_vnni():
        notes.append("VNNI: INT8 (ONNX Runtime U8S8 QDQ, OpenVINO) is fast")
    else:
        notes.append("no VNNI: INT8 runs on plain AVX2/AVX-512 integer kernels, smaller gains than with VNNI")
    if "amx_tile" not in flags:
        notes.append("no AMX: BF16 is not faster than FP32 here" if "avx512_bf16" in flags
                     else "no AVX512-BF16/AMX: BF16 is emulated, expect it slower than FP32")
    return Check("cpu", True, None, f"{m['cpu']}, {m['physical_cores']} physical cores; flags: "
                 f"{', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}; " + "; ".join(notes),
                 extra={"flags": flags, "physical_cores": m["physical_cores"]})


def check_modelopt() -> Check:
    from .stages.quantize_tensorrt import modelopt_available

    v = installed_version("nvidia-modelopt")
    if v is None:
        return Check("nvidia-modelopt", False, None,
                     why="not installed: the int8-tensorrt recipe falls back to ONNX Runtime symmetric QDQ",
                     fix="pip install nvidia-modelopt onnx-graphsurgeon onnxslim requests (not the [onnx] extra: "
                         "it pulls onnxruntime-gpu next to onnxruntime)")
    ok, reason = modelopt_available()
    if ok:
        return Check("nvidia-modelopt", True, v, "ONNX INT8 PTQ usable (calibrates on CPU)")
    return Check("nvidia-modelopt", False, v, why=reason, fix="install the missing module named above")


def check_bentoml() -> Check:
    v = installed_version("bentoml")
    if v:
        return Check("bentoml", True, v, "deploykit serve can run (set BENTOML_DO_NOT_TRACK=True offline)")
    return Check("bentoml", False, None, why="not installed", fix="pip install bentoml (the `serve` extra)")


def checks() -> tuple[Callable[[], Check], ...]:
    """The CPU check, every registered backend's own checks (``Backend.doctor_checks``), then modelopt and BentoML."""
    from .backends import BACKENDS

    runtimes = tuple(fn for _, backend in BACKENDS.items() for fn in backend.doctor_checks())
    return (check_cpu, *runtimes, check_modelopt, check_bentoml)


def __getattr__(name: str):
    if name == "CHECKS":  # read from the registry on each access: a backend registered later is included
        return checks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_checks() -> list[Check]:
    """Run every check; a check that crashes is reported as a failed check, not raised."""
    out = []
    for fn in checks():
        try:
            out.append(fn())
        except Exception as err:  # a doctor must not die of the disease it diagnoses
            out.append(Check(fn.__name__.removeprefix("check_"), False, None, why=f"check crashed: {err!r}",
                             fix="report this as a deploykit bug"))
    return out


def as_dict(results: list[Check]) -> list[dict]:
    return [asdict(c) for c in results]
