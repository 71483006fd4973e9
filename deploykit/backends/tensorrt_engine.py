"""TensorRT engines: build one from an ONNX, with an ``engine.json`` that says what it is bound to, and check it.

A serialized TensorRT engine only loads on the TensorRT version that built it and on a GPU of the same
compute capability. ``engine.json`` records TensorRT/CUDA/driver versions, GPU name and compute
capability, precision and the optimization profile, so ``check_engine_compatible`` can refuse a
mismatched engine *before* deserializing it (TensorRT itself fails late and cryptically), or rebuild
it from the stored ONNX on request.

Status: the TensorRT calls below follow the TensorRT 10 Python API documentation and were NEVER
executed (no GPU and no TensorRT on the machines this was written on; see docs/gpu.md). The
compatibility logic, ``engine.json`` handling and the "TensorRT missing" paths were executed and tested.

Import-light (the backend registry imports every module here): tensorrt, pynvml, onnx and torch are imported
inside the functions that use them. The pipeline stage is ``deploykit.stages.build_engine``; the runner is
``deploykit.backends.tensorrt_backend``.

Example:
    >>> info = build_engine("a.deploykit/model.onnx", "a.deploykit/model.engine", precision="int8",
    ...                     min_batch=1, opt_batch=8, max_batch=64)
    >>> check_engine_compatible("a.deploykit/engine.json")   # [] or raises EngineMismatchError
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DeployKitError

ENGINE_FILE, ENGINE_JSON = "model.engine", "engine.json"
ENGINE_SCHEMA = 1
TRT_INSTALL_FIX = ("on a machine with an NVIDIA GPU and driver: `pip install tensorrt-cu12 --extra-index-url "
                   "https://pypi.nvidia.com` (its libraries come from NVIDIA's index, not PyPI), or use the NGC "
                   "container nvcr.io/nvidia/tensorrt")


class TensorRTUnavailable(DeployKitError):
    """TensorRT or a usable NVIDIA GPU is missing on this machine."""


class EngineMismatchError(DeployKitError):
    """A serialized engine was built for another TensorRT version or GPU than the one running now."""


def tensorrt_status() -> tuple[str | None, str]:
    """(version or None, reason): whether ``import tensorrt`` works here, and why not."""
    import importlib.metadata as md

    try:
        import tensorrt as trt  # noqa: F401  (lazy: only here and in the functions that build/run)
    except ImportError as err:
        try:
            dist = md.version("tensorrt")
            why = f"package tensorrt {dist} is installed but does not import ({err})"
        except md.PackageNotFoundError:
            why = "TensorRT is not installed (its PyPI packages fetch their libraries from NVIDIA's index)"
        return None, why
    except OSError as err:  # libnvinfer present but a CUDA library missing
        return None, f"TensorRT's libraries fail to load ({err})"
    return trt.__version__, f"tensorrt {trt.__version__}"


def gpu_environment() -> dict[str, Any]:
    """What an engine is bound to, on the running machine: TensorRT, CUDA, driver, GPU, compute capability.

    Missing pieces are None. Uses NVML (nvidia-ml-py) for the driver and GPU, and torch only for the
    CUDA runtime version it was built with, so nothing here needs a GPU to *run*.
    """
    env: dict[str, Any] = {"tensorrt": tensorrt_status()[0], "cuda_runtime": None, "driver": None,
                           "gpu": None, "compute_capability": None, "gpu_error": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            env["gpu"] = name.decode() if isinstance(name, bytes) else name
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            env["compute_capability"] = f"{major}.{minor}"
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        env["gpu_error"] = "nvidia-ml-py (pynvml) is not installed"
    except Exception as err:  # pynvml.NVMLError_*: no driver / no device
        env["gpu_error"] = f"NVML: {err}"
    if env["tensorrt"]:
        try:  # the CUDA runtime TensorRT's Python bindings report, when they do (TRT >= 10)
            import tensorrt as trt

            env["cuda_runtime"] = getattr(trt, "__cuda_version__", None)
        except ImportError:
            pass
    if env["cuda_runtime"] is None:
        try:
            import importlib.metadata as md

            env["cuda_runtime"] = md.version("nvidia-cuda-runtime")
        except Exception:
            pass
    return env


def onnx_io(onnx_path: str | Path) -> dict[str, Any]:
    """Input/output names and shapes of an ONNX file (dynamic dims as their symbol), without weights."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    init = {t.name for t in g.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": [{"name": v.name, "shape": dims(v)} for v in g.input if v.name not in init],
            "outputs": [{"name": v.name, "shape": dims(v)} for v in g.output]}


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def default_timing_cache(env: dict[str, Any]) -> Path:
    """Per TensorRT version and GPU architecture: a cache from another GPU would be ignored or mislead."""
    cc = (env.get("compute_capability") or "unknown").replace(".", "")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deploykit"
    return root / f"trt-timing-{env.get('tensorrt') or 'none'}-sm{cc}.cache"


def build_engine(onnx: str | Path, out: str | Path, precision: str = "int8", *, min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 64, workspace_mb: int = 2048,
                 timing_cache: str | Path | None = None, onnx_name: str | None = None) -> dict:
    """Build and atomically write a serialized TensorRT engine plus ``engine.json`` beside it. NEVER RUN here.

    Args:
        onnx: ONNX file (INT8 Q/DQ for precision int8; float or fp16 for fp16/fp32).
        out: engine path; ``engine.json`` goes in the same directory.
        precision: int8 (explicit Q/DQ, float layers in fp16), fp16, or fp32.
        min_batch/opt_batch/max_batch: the optimization profile for the dynamic batch axis.
        workspace_mb: builder workspace memory pool limit.
        timing_cache: file reused across builds (read if present, updated after the build).
        onnx_name: the ONNX name to record (the artifact renames its final model to model.onnx).
    Returns:
        the engine.json content.
    """
    import time

    from ..artifact import sha256_file, write_json

    version, why = tensorrt_status()
    if version is None:
        raise TensorRTUnavailable(why, fix=TRT_INSTALL_FIX)
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise DeployKitError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}",
                             fix="pass e.g. --min-batch 1 --opt-batch 8 --max-batch 64")
    import tensorrt as trt

    env = gpu_environment()
    if env["gpu"] is None:
        raise TensorRTUnavailable(f"TensorRT {version} is installed but no NVIDIA GPU is visible ({env['gpu_error']})",
                                  fix="run on a machine with an NVIDIA GPU and driver")
    onnx, out = Path(onnx), Path(out)
    io = onnx_io(onnx)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(version.split(".")[0])
    # TensorRT 11 removed the precision builder flags: networks are strongly typed and precision comes
    # from the ONNX itself (Q/DQ for int8, fp16 tensors for fp16). TensorRT 10 still uses the flags.
    strongly_typed = not hasattr(trt.BuilderFlag, "INT8")
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployKitError(f"TensorRT's ONNX parser rejected {onnx.name}: {errors}",
                             fix="check the model with `polygraphy inspect model`, or re-export with another opset")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)   # float layers between Q/DQ regions run in fp16
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)   # Q/DQ graph: explicit quantization, no calibrator
    profile = builder.create_optimization_profile()
    shapes = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        chw = tuple(t.shape)[1:]
        if any(d < 0 for d in chw):
            raise DeployKitError(f"input {t.name} has dynamic non-batch dims {tuple(t.shape)}",
                                 fix="export with a fixed input size (only the batch axis may be dynamic)")
        mn, op, mx = ((b, *chw) for b in (min_batch, opt_batch, max_batch))
        profile.set_shape(t.name, mn, op, mx)
        shapes.append({"name": t.name, "dtype": str(t.dtype), "min": list(mn), "opt": list(op), "max": list(mx)})
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(env)
    cache_in = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_in)
    cache_reused = bool(cache_in) and config.set_timing_cache(cache, ignore_mismatch=False)
    if not cache_reused:  # a cache from another device/version is refused: start a fresh one
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployKitError(f"TensorRT failed to build an engine from {onnx.name} (see the log above)",
                             fix="try a larger --workspace-mb, or --precision fp16")
    build_s = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, memoryview(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    info = {
        "schema": ENGINE_SCHEMA,
        "engine": out.name,
        "engine_sha256": sha256_file(out),
        "onnx": onnx_name or onnx.name,
        "onnx_sha256": sha256_file(onnx),
        "precision": precision,
        "typing": "strong" if strongly_typed else "weak",
        "tensorrt": version,
        "cuda_runtime": env["cuda_runtime"],
        "driver": env["driver"],
        "gpu": env["gpu"],
        "compute_capability": env["compute_capability"],
        "hardware_compatibility": "none",   # engines are bound to this compute capability
        "version_compatible": False,        # and to this exact TensorRT version
        "inputs": shapes,
        "outputs": io["outputs"],
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "workspace_mb": workspace_mb,
        "timing_cache": {"path": str(cache_path), "reused": cache_reused},
        "build_seconds": round(build_s, 2),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out.parent / ENGINE_JSON, info)
    return info


def check_engine_compatible(engine_json: str | Path | dict, running: dict[str, Any] | None = None, *,
                            raise_on_mismatch: bool = True) -> list[str]:
    """Compare an engine's ``engine.json`` with the running TensorRT and GPU, before deserializing.

    Hard mismatches (raise EngineMismatchError): TensorRT version (engines are not portable across
    versions unless built version-compatible), compute capability (unless built hardware-compatible),
    no TensorRT or no GPU here. Soft ones (returned as "warning: ..." lines): another GPU model of the same
    compute capability (loads, but tactics were timed on the other GPU), another driver.

    Args:
        engine_json: path to engine.json, or its content.
        running: the running environment (``gpu_environment()`` when None); tests pass a recorded one.
    Returns:
        warning lines (empty when everything matches).
    """
    info = engine_json if isinstance(engine_json, dict) else json.loads(Path(engine_json).read_text())
    env = gpu_environment() if running is None else running
    name = info.get("engine", ENGINE_FILE)
    hard: list[str] = []
    if not env.get("tensorrt"):
        hard.append(f"TensorRT is not available here (engine {name} needs TensorRT {info.get('tensorrt')})")
    elif env["tensorrt"] != info.get("tensorrt") and not info.get("version_compatible"):
        hard.append(f"engine {name} was built with TensorRT {info.get('tensorrt')}, this machine runs {env['tensorrt']}")
    if not env.get("compute_capability"):
        hard.append(f"no NVIDIA GPU visible here (engine {name} was built for {info.get('gpu')}, "
                    f"compute capability {info.get('compute_capability')})")
    elif env["compute_capability"] != info.get("compute_capability") and info.get("hardware_compatibility", "none") == "none":
        hard.append(f"engine {name} was built for compute capability {info.get('compute_capability')} "
                    f"({info.get('gpu')}), this GPU is {env['compute_capability']} ({env.get('gpu')})")
    warnings = []
    if not hard:
        if env.get("gpu") != info.get("gpu"):
            warnings.append(f"warning: engine tuned on {info.get('gpu')}, running on {env.get('gpu')} "
                            "(same compute capability: it loads, but rebuild for best speed)")
        if env.get("driver") and info.get("driver") and env["driver"] != info["driver"]:
            warnings.append(f"warning: driver {env['driver']} differs from build driver {info['driver']}")
    if hard and raise_on_mismatch:
        raise EngineMismatchError("; ".join(hard),
                                  fix="rebuild the engine on this machine: `deploykit build-engine ARTIFACT` "
                                      "(or load it with rebuild_on_mismatch=True / --rebuild-on-mismatch)")
    return [f"mismatch: {h}" for h in hard] + warnings


def ensure_engine(engine_path: str | Path, *, rebuild_on_mismatch: bool = False,
                  running: dict[str, Any] | None = None, timing_cache: str | Path | None = None) -> dict:
    """Return engine.json of a loadable engine at ``engine_path``; rebuild it from its ONNX if asked.

    Raises EngineMismatchError (or a missing-file DeployKitError) otherwise. Call before deserializing.
    """
    engine_path = Path(engine_path)
    meta_path = engine_path.parent / ENGINE_JSON
    if not engine_path.is_file() or not meta_path.is_file():
        raise DeployKitError(f"no TensorRT engine at {engine_path} (or its {ENGINE_JSON} is missing)",
                             fix=f"build one: `deploykit build-engine {engine_path.parent}`")
    info = json.loads(meta_path.read_text())
    try:
        check_engine_compatible(info, running)
    except EngineMismatchError as err:
        onnx = engine_path.parent / info.get("onnx", "model.onnx")
        if not rebuild_on_mismatch or not onnx.is_file():
            raise
        from ..artifact import sha256_file

        if info.get("onnx_sha256") and sha256_file(onnx) != info["onnx_sha256"]:
            raise EngineMismatchError(f"{err.problem}; and {onnx.name} changed since the engine was built",
                                      fix="rebuild explicitly with `deploykit build-engine`") from None
        b = info.get("batch", {})
        info = build_engine(onnx, engine_path, info.get("precision", "fp16"), min_batch=b.get("min", 1),
                            opt_batch=b.get("opt", 8), max_batch=b.get("max", 64),
                            workspace_mb=info.get("workspace_mb", 2048), timing_cache=timing_cache,
                            onnx_name=onnx.name)
    return info


def build_artifact_engine(artifact: str | Path, precision: str = "auto", **kwargs: Any) -> dict:
    """`deploykit build-engine`: pick the artifact's ONNX for ``precision``, check it, build the engine beside it.

    int8 needs a TensorRT-ready Q/DQ graph (``--int8 --target tensorrt``); fp16/fp32 build from the float
    export (TensorRT 10 sets the FP16 flag) or from the artifact's fp16 graph.
    """
    from ..artifact import FINAL_MODEL, FLOAT_MODEL, Artifact
    from ..onnx_checks import check_qdq_placement

    art = Artifact.open(artifact)
    have = art.runtime.get("precision", "fp32")
    precision = have if precision == "auto" else precision
    if precision not in ("int8", "fp16", "fp32"):
        raise DeployKitError(f"TensorRT engines are int8, fp16 or fp32; artifact {art.path} is {precision}",
                             fix="pass --precision fp16, or compress with --fp16 --target tensorrt")
    if precision == "int8":
        if have != "int8":
            raise DeployKitError(f"artifact {art.path} is {have}, not INT8",
                                 fix="compress with --int8 --target tensorrt, or pass --precision fp16")
        onnx = art.path / FINAL_MODEL
        check_qdq_placement(onnx)  # a CPU (U8, asymmetric) INT8 graph fails here with the reason
    elif have == precision or not (art.path / FLOAT_MODEL).is_file():
        onnx = art.path / FINAL_MODEL
    else:
        onnx = art.path / FLOAT_MODEL
    return build_engine(onnx, art.path / ENGINE_FILE, precision, onnx_name=onnx.name, **kwargs)
