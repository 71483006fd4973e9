"""What machine and library versions a number was measured with (recorded in manifests and benchmarks).

Example:
    >>> machine()["cpu"], versions()["onnxruntime"]
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from functools import lru_cache

# Packages that decide results whatever the runtime; each backend adds its own (``Backend.packages``).
GENERAL_PACKAGES = ("deploykit", "torch", "timm", "onnx", "nncf", "torch-pruning", "nvidia-modelopt", "bentoml",
                    "numpy")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def packages() -> tuple[str, ...]:
    """GENERAL_PACKAGES, then every registered backend's packages (each once, in registry order)."""
    from .backends import BACKENDS

    names = dict.fromkeys(GENERAL_PACKAGES)
    for _, backend in BACKENDS.items():
        names.update(dict.fromkeys(backend.packages))
    return tuple(names)


def __getattr__(name: str):
    if name == "PACKAGES":  # read from the registry on access (the backend modules load on first lookup)
        return packages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def versions() -> dict[str, str]:
    """Installed versions of the packages that decide results (absent ones omitted)."""
    out = {"python": platform.python_version()}
    for name in packages():
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


# x86 flags whose INT8 dot product (VPDPBUSD, AMX TMUL) accumulates u8 x s8 products in int32. Without them ONNX
# Runtime multiplies with VPMADDUBSW, which adds pairs of products in int16 and saturates with full-range weights.
INT8_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_cpu_flag(*flags: str) -> bool:
    """True when this CPU reports any of ``flags`` (names as in CPU_FLAGS)."""
    return bool(set(flags) & set(machine()["cpu_flags"]))


def has_int8_vnni() -> bool:
    """True when this CPU's INT8 kernels accumulate in int32 (VNNI/AMX): full-range 8-bit weights are safe."""
    return has_cpu_flag(*INT8_VNNI_FLAGS)


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (recorded next to timings: a busy machine explains noisy numbers)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['physical_cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX-512'}), {m['os']}"
