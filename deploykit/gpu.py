"""The CUDA GPU as torch sees it: whether there is one, what it is, and how much of its memory a call used.

Used by the torch-cuda runtime and by ``deploykit bench --device cuda``. torch is imported inside the functions
(``import deploykit`` stays light).

Status: ``cuda_unavailable`` and the CPU branches run on every machine; everything that needs a GPU (device
properties, driver version, memory statistics) was written to the torch.cuda documentation and has NOT yet run on
a GPU (docs/gpu.md).

Example:
    >>> cuda_unavailable()          # None on a machine where torch sees a GPU
    'torch 2.14.1+cu130 (CUDA 13.0 build) sees no CUDA GPU: torch.cuda.is_available() is False'
    >>> gpu_machine_line()          # on a GPU machine
    'NVIDIA H200 (139.8 GiB, sm 9.0), driver 570.xx, CUDA 13.0, torch 2.11.0+cu130'
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

CUDA_FIX = "run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch (nvidia-smi must work)"


def cuda_unavailable() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can. Never raises."""
    try:
        import torch
    except Exception as err:  # a broken install is a reason, not a crash
        return f"torch does not import ({type(err).__name__}: {err})"
    try:
        if torch.cuda.is_available():
            return None
    except Exception as err:
        return f"torch.cuda.is_available() failed ({type(err).__name__}: {err})"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build}) sees no CUDA GPU: torch.cuda.is_available() is False"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' pass through."""
    if device == "auto":
        return "cpu" if cuda_unavailable() else "cuda"
    if device != "cpu" and not str(device).startswith("cuda"):
        from .errors import DeployKitError

        raise DeployKitError(f"device {device!r} is not auto, cpu or cuda[:N]", fix="use --device cuda or cpu")
    return device


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (/proc/driver/nvidia/version, else nvidia-smi), or None."""
    p = Path("/proc/driver/nvidia/version")
    try:
        if p.is_file():
            for word in p.read_text().split():  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06 ..."
                if word.count(".") >= 1 and word.replace(".", "").isdigit():
                    return word
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_info(device: str = "cuda") -> dict[str, Any]:
    """Name, memory, compute capability of ``device``, the driver, and the CUDA/cuDNN/torch versions."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver_version()}
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        info["cudnn"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if cuda_unavailable() is None:
        d = torch.device(device)
        props = torch.cuda.get_device_properties(d)
        info.update({"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "compute_capability": f"{props.major}.{props.minor}",
                     "multiprocessors": props.multi_processor_count, "device_count": torch.cuda.device_count()})
    else:
        info["gpu"] = None
    return info


def gpu_machine_line(device: str = "cuda") -> str:
    """One line for reports: GPU name, memory, compute capability, driver, CUDA and torch versions."""
    i = gpu_info(device)
    if not i.get("gpu"):
        return f"no CUDA GPU (torch {i['torch']})"
    return (f"{i['gpu']} ({i['memory_gib']} GiB, sm {i['compute_capability']}), driver {i['driver'] or '?'}, "
            f"CUDA {i['cuda']}, cuDNN {i['cudnn']}, torch {i['torch']}")


def memory_mark(device: str = "cuda") -> int:
    """Reset the peak-memory counter of ``device``; returns the bytes allocated now (the baseline of a call)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_peak_mb(baseline: int, device: str = "cuda") -> float:
    """MiB allocated at the peak since ``memory_mark`` above its baseline: the memory a call needed."""
    import torch

    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - baseline) / 2**20, 1)


def memory_now_mb(device: str = "cuda") -> dict[str, float]:
    """MiB allocated and reserved (by torch's caching allocator) on ``device`` now."""
    import torch

    return {"allocated_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1),
            "reserved_mb": round(torch.cuda.memory_reserved(device) / 2**20, 1)}


def is_out_of_memory(err: BaseException) -> bool:
    """Is ``err`` torch's CUDA out-of-memory error (then the caller frees the cache and stops growing the batch)?"""
    return type(err).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(err)


def free_cached_memory() -> None:
    """Give cached, unused blocks back to the driver (after an out-of-memory error)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
