"""What this machine can run: CPU features, runtimes, GPU stack; for each missing piece, why and how to get it.

Every check imports its library inside a try block and reports what actually happened here (an
installed-but-broken package is reported as broken, with the error), never what "should" be there.

Example:
    >>> for c in run_checks(): print(c.name, c.ok, c.version, c.detail)
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
from dataclasses import asdict, dataclass, field


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


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_cpu() -> Check:
    from .environment import CPU_FLAGS, machine

    m = machine()
    flags = m["cpu_flags"]
    notes = []
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        notes.append("VNNI: INT8 (ONNX Runtime U8S8 QDQ, OpenVINO) is fast")
    else:
        notes.append("no VNNI: INT8 runs on plain AVX2/AVX-512 integer kernels, smaller gains than with VNNI")
    if "amx_tile" not in flags:
        notes.append("no AMX: BF16 is not faster than FP32 here" if "avx512_bf16" in flags
                     else "no AVX512-BF16/AMX: BF16 is emulated, expect it slower than FP32")
    return Check("cpu", True, None, f"{m['cpu']}, {m['physical_cores']} physical cores; flags: "
                 f"{', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}; " + "; ".join(notes),
                 extra={"flags": flags, "physical_cores": m["physical_cores"]})


def check_onnxruntime() -> Check:
    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    try:
        import onnxruntime as ort
    except Exception as err:
        return Check("onnxruntime", False, cpu or gpu, why=f"does not import ({err})",
                     fix="pip install onnxruntime (CPU) or onnxruntime-gpu (NVIDIA), never both")
    providers = list(ort.get_available_providers())
    detail = f"providers: {', '.join(providers)}"
    if cpu and gpu:
        return Check("onnxruntime", False, ort.__version__, detail,
                     why=f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed: they overwrite each "
                         "other's files in the same `onnxruntime` module",
                     fix="pip uninstall -y onnxruntime onnxruntime-gpu, then install exactly one of them",
                     extra={"providers": providers})
    return Check("onnxruntime", True, ort.__version__, detail + f" (package {'onnxruntime-gpu' if gpu else 'onnxruntime'})",
                 extra={"providers": providers})


def check_onnxruntime_gpu() -> Check:
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception:
        providers = []
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in providers]
    if gpu:
        return Check("onnxruntime GPU providers", True, _version("onnxruntime-gpu"), ", ".join(gpu) +
                     " offered (they still need a CUDA driver and GPU at session creation)")
    return Check("onnxruntime GPU providers", False, None,
                 why="the installed onnxruntime package is the CPU build: no CUDA/TensorRT execution providers",
                 fix="in a separate environment: pip install onnxruntime-gpu (it replaces onnxruntime; "
                     "the `gpu` extra of deploykit)")


def check_cuda() -> Check:
    from .stages.build_engine import gpu_environment

    env = gpu_environment()
    torch_cuda, torch_avail = None, False
    try:
        import torch

        torch_cuda, torch_avail = torch.version.cuda, bool(torch.cuda.is_available())
    except Exception:
        pass
    extra = {**env, "torch_cuda_build": torch_cuda, "torch_cuda_available": torch_avail}
    if env["gpu"]:
        return Check("cuda", True, env["driver"], f"GPU {env['gpu']} (compute capability {env['compute_capability']}), "
                     f"driver {env['driver']}; torch CUDA build {torch_cuda}, torch sees GPU: {torch_avail}", extra=extra)
    return Check("cuda", False, None, f"torch CUDA build {torch_cuda}, torch sees GPU: {torch_avail}",
                 why=f"no NVIDIA GPU/driver visible ({env['gpu_error']})",
                 fix="run on a machine with an NVIDIA GPU and its driver (nvidia-smi must work)", extra=extra)


def check_tensorrt() -> Check:
    from .stages.build_engine import TRT_INSTALL_FIX, tensorrt_status

    version, why = tensorrt_status()
    if version:
        return Check("tensorrt", True, version, "deploykit build-engine and the `tensorrt` backend can run")
    return Check("tensorrt", False, None, why=why, fix=TRT_INSTALL_FIX)


def check_torch_tensorrt() -> Check:
    v = _version("torch-tensorrt") or _version("torch_tensorrt")
    if v:
        return Check("torch-tensorrt", True, v, "optional PyTorch-side compile path")
    return Check("torch-tensorrt", False, None, why="not installed (optional; needs TensorRT and a CUDA torch)",
                 fix="pip install torch-tensorrt matching your torch version, on a machine with TensorRT")


def check_modelopt() -> Check:
    from .stages.quantize_tensorrt import modelopt_available

    v = _version("nvidia-modelopt")
    if v is None:
        return Check("nvidia-modelopt", False, None,
                     why="not installed: the int8-tensorrt recipe falls back to ONNX Runtime symmetric QDQ",
                     fix="pip install nvidia-modelopt onnx-graphsurgeon onnxslim requests (not the [onnx] extra: "
                         "it pulls onnxruntime-gpu next to onnxruntime)")
    ok, reason = modelopt_available()
    if ok:
        return Check("nvidia-modelopt", True, v, "ONNX INT8 PTQ usable (calibrates on CPU)")
    return Check("nvidia-modelopt", False, v, why=reason, fix="install the missing module named above")


def check_openvino() -> Check:
    v = _version("openvino")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import openvino as ov

            devices = ov.Core().available_devices
    except Exception as err:
        return Check("openvino", False, v, why=f"{'not installed' if v is None else f'does not work ({err})'}",
                     fix="pip install openvino nncf (the `openvino` extra)")
    return Check("openvino", True, v, f"devices: {', '.join(devices)}", extra={"devices": devices})


def check_bentoml() -> Check:
    v = _version("bentoml")
    if v:
        return Check("bentoml", True, v, "deploykit serve can run (set BENTOML_DO_NOT_TRACK=True offline)")
    return Check("bentoml", False, None, why="not installed", fix="pip install bentoml (the `serve` extra)")


CHECKS = (check_cpu, check_onnxruntime, check_onnxruntime_gpu, check_cuda, check_tensorrt, check_torch_tensorrt,
          check_modelopt, check_openvino, check_bentoml)


def run_checks() -> list[Check]:
    """Run every check; a check that crashes is reported as a failed check, not raised."""
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as err:  # a doctor must not die of the disease it diagnoses
            out.append(Check(fn.__name__.removeprefix("check_"), False, None, why=f"check crashed: {err!r}",
                             fix="report this as a deploykit bug"))
    return out


def as_dict(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
