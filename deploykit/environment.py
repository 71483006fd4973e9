"""What machine and library versions a number was measured with (recorded in manifests and benchmarks).

Example:
    >>> machine()["cpu"], versions()["onnxruntime"]
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from functools import lru_cache

PACKAGES = ("deploykit", "torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
            "torch-pruning", "nvidia-modelopt", "tensorrt", "bentoml", "numpy")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def versions() -> dict[str, str]:
    """Installed versions of the packages that decide results (absent ones omitted)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def machine() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("unknown", ""):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    from .backends.base import physical_cores

    return {"cpu": cpu, "arch": platform.machine(), "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "os": platform.platform(terse=True)}


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['physical_cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX-512'}), {m['os']}"
