"""Recipes: YAML data that lists the pipeline's stages, each with a typed, versioned config.

A recipe file looks like::

    version: 1
    name: int8-ptq
    target: cpu
    data: {calibration_images: 300}
    stages:
      - fuse_bn
      - export_onnx: {opset: 17}
      - quantize_onnx: {method: minmax, per_channel: true}

Stage entries are a bare name or a one-key mapping ``name: {config}``; each config is validated
against the stage's own pydantic model (unknown fields are errors). CLI flags are presets: they
pick a recipe file and override fields with dotted keys (``stages.quantize_onnx.method``).

Example:
    >>> r = load_recipe("int8-ptq")
    >>> r.stage_names()
    ['fuse_bn', 'export_onnx', 'quantize_onnx']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from .errors import RecipeError
from .stages.config import StageConfig

RECIPE_DIR = Path(__file__).parent / "recipes"
RECIPE_VERSION = 1


def parse_input_size(value: Any) -> tuple[int, ...] | None:
    """``224``, ``"60x80"`` (height x width), ``"3x60x80"`` or a list of those numbers -> a tuple (H, W) or (C, H, W).

    Example:
        >>> parse_input_size("60x80"), parse_input_size(224), parse_input_size([3, 60, 80])
        ((60, 80), (224, 224), (3, 60, 80))
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value, value]
    elif isinstance(value, str):
        text = value.strip().lower().replace("*", "x").replace(",", "x")
        try:
            parts = [int(p) for p in text.split("x")]
        except ValueError:
            raise ValueError(f"input size {value!r} is not N, HxW or CxHxW (e.g. 224, 60x80, 3x60x80)") from None
        parts = parts * 2 if len(parts) == 1 else parts
    elif isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        raise ValueError(f"input size {value!r} is not N, HxW or CxHxW")
    if len(parts) not in (2, 3):
        raise ValueError(f"input size {value!r} has {len(parts)} numbers; give N, HxW or CxHxW")
    if min(parts[-2:]) < 8 or (len(parts) == 3 and parts[0] < 1):
        raise ValueError(f"input size {value!r}: height and width must be at least 8 pixels")
    return tuple(parts)


class ModelConfig(BaseModel):
    """What the checkpoint does not say (or what the user wants to override)."""

    model_config = ConfigDict(extra="forbid")
    arch: str | None = None
    factory: str | None = Field(None, description="a user's own model: FILE.py:NAME or package.module:NAME, a "
                                                  "callable returning an nn.Module (importing it runs its code)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    num_classes: int | None = Field(None, ge=1)
    in_chans: int | None = Field(None, ge=1)
    input_size: tuple[int, int] | None = Field(None, description="(height, width) in pixels; a recipe or flag may "
                                                                 "say 224, 60x80 or 3x60x80")
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1, description="centre crop fraction at evaluation (timm eval)")
    class_names: list[str] | None = None
    weights: Literal["ema", "model", "swa"] | None = Field(None, description="which weights of a file holding "
                                                                          "several; None = EMA when present")
    trust_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _split_input_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("input_size") is not None:
            size = parse_input_size(data["input_size"])
            data = dict(data, input_size=size[-2:])
            if len(size) == 3:
                if data.get("in_chans") not in (None, size[0]):
                    raise ValueError(f"input_size says {size[0]} channels but in_chans is {data['in_chans']}")
                data["in_chans"] = size[0]
        return data


class DataConfig(BaseModel):
    """Where images come from. ``name`` None means data-free (synthetic calibration)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="a registered dataset (deploykit.data.dataset_names()), an "
                                                     "ImageFolder path, or None for data-free")
    calibration_images: int = Field(300, ge=1, description="300 = NNCF's default subset; 512 and 256 gave the same "
                                                          "INT8 accuracy on the reference (docs/decisions.md)")
    eval_images: int | None = Field(None, ge=1, description="None = the whole evaluation split")
    batch_size: int = Field(64, ge=1)
    check_images: int = Field(256, ge=8, description="held-out images for every stage's parity check")
    synthetic_images: int = Field(32, ge=1, description="data-free: BN-matched inputs synthesized for calibration")
    synthetic_steps: int = Field(4, ge=0, description="data-free: optimisation steps per synthetic batch (0 = "
                                                       "Gaussian noise); 4 kept the INT8 fidelity of 8 on real "
                                                       "images at half the time (bench/results/synthesis_curve.md)")
    synthetic_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="data-free: BF16 autocast for the synthesis passes; auto = where the CPU has native BF16")
    seed: int = 0


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    latency_runs: int = Field(30, ge=3, description="timed runs per batch size (after warm-up)")
    warmup_runs: int = Field(5, ge=0)
    latency_budget_s: float = Field(20.0, gt=0, description="time cap per batch size (at least 3 rounds)")
    threads: int | None = Field(None, ge=1, description="intra-op threads; None = physical cores")


class StageSpec(BaseModel):
    """One pipeline step: a registered stage name and its validated config."""

    model_config = ConfigDict(extra="forbid")
    name: str
    config: SerializeAsAny[StageConfig]

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, value: Any) -> Any:
        from .stages import STAGES  # registry; stage modules are light to import

        if isinstance(value, StageSpec):
            return value
        if isinstance(value, str):
            name, cfg = value, {}
        elif isinstance(value, dict) and set(value) == {"name", "config"}:
            name, cfg = value["name"], value["config"]
        elif isinstance(value, dict) and len(value) == 1:
            (name, cfg), = value.items()
        else:
            raise ValueError(f"a stage is a name or a one-key mapping 'name: {{config}}', got {value!r}")
        cfg = {} if cfg is None else cfg
        stage_cls = STAGES.get(name)
        if isinstance(cfg, StageConfig):
            return {"name": name, "config": cfg}
        return {"name": name, "config": stage_cls.Config.model_validate(cfg)}


class Recipe(BaseModel):
    """A whole compression job: model, data, ordered stages, evaluation, target runtime."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = RECIPE_VERSION
    name: str = "custom"
    description: str = ""
    target: Literal["cpu", "tensorrt", "cuda", "gpu"] = "cpu"  # gpu: the torch-cuda runtime (recipes gpu-*)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageSpec]
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> StageSpec | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_yaml(self) -> str:
        """The resolved recipe, every default spelled out, in the same shape load_recipe reads."""
        data = self.model_dump(mode="json")
        data["stages"] = [{s["name"]: s["config"]} for s in data["stages"]]
        return yaml.safe_dump(data, sort_keys=False)

    def stage_index(self, ref: str) -> int:
        """Position of the stage ``ref`` names: an index (``"2"``) or a name the recipe lists exactly once.

        Example:
            >>> load_recipe("int8-ptq").stage_index("export_onnx")
            1
        """
        names = self.stage_names()
        if ref.lstrip("-").isdigit():
            i = int(ref)
            if not 0 <= i < len(names):
                raise RecipeError(f"recipe {self.name!r} has no stage at index {i} (it has {len(names)}: "
                                  f"{', '.join(names)})", fix=f"use an index from 0 to {len(names) - 1}")
            return i
        at = [i for i, n in enumerate(names) if n == ref]
        if not at:
            raise RecipeError(f"recipe {self.name!r} has no stage {ref!r} (it has {', '.join(names)})",
                              fix=f"use a recipe with a {ref} stage")
        if len(at) > 1:
            raise RecipeError(f"recipe {self.name!r} lists stage {ref!r} {len(at)} times (at {', '.join(map(str, at))})",
                              fix=f"address one by its index, e.g. stages.{at[0]}.<field>")
        return at[0]

    def with_overrides(self, overrides: dict[str, Any]) -> "Recipe":
        """A copy with dotted-key overrides applied; ``None`` values are ignored (flag not given).

        A stage is addressed by name when the recipe lists it once, else by index: ``stages.quantize_onnx.method``
        or ``stages.2.method``. Stages keep their order, repeated ones included.

        Example:
            >>> load_recipe("int8-ptq").with_overrides({"stages.quantize_onnx.method": "entropy"})
        """
        data = self.model_dump(mode="json")
        configs = [s["config"] for s in data["stages"]]
        for key, value in overrides.items():
            if value is None:
                continue
            parts = key.split(".")
            if parts[0] == "stages":
                if len(parts) != 3:
                    raise RecipeError(f"override {key!r} must look like stages.<stage name or index>.<field>")
                if not parts[1].lstrip("-").isdigit() and parts[1] not in self.stage_names():
                    raise RecipeError(f"option {parts[2]!r} needs stage {parts[1]!r}, which recipe {self.name!r} "
                                      "does not have", fix=f"use a recipe with a {parts[1]} stage")
                configs[self.stage_index(parts[1])][parts[2]] = value
                continue
            node = data
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        data["stages"] = [{s["name"]: c} for s, c in zip(data["stages"], configs)]
        return parse_recipe(data, source=f"{self.name} + overrides")

    def with_stage(self, name: str, config: dict | None = None, after: str | None = None) -> "Recipe":
        """A copy with stage ``name`` inserted after stage ``after`` (appended when None or absent).

        Example:
            >>> load_recipe("int8-ptq").with_stage("accuracy_guard", {"max_drop": 0.5}, after="quantize_onnx")
        """
        data = self.model_dump(mode="json")
        stages = [{s["name"]: s["config"]} for s in data["stages"]]
        names = [s["name"] for s in data["stages"]]
        at = names.index(after) + 1 if after in names else len(stages)
        stages.insert(at, {name: config or {}})
        data["stages"] = stages
        return parse_recipe(data, source=f"{self.name} + {name}")


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "recipe"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {first['msg']}{more}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} is not a mapping", fix="see recipes/int8-ptq.yaml for the format")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"invalid recipe {source}: {_format_validation(err)}",
                          fix="compare with recipes/int8-ptq.yaml or run with --dry-run") from None


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by built-in name (``int8-ptq``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"recipe {str(name_or_path)!r} not found",
                          fix=f"give a YAML path or one of: {', '.join(list_recipes())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_recipe(data, source=str(path))
