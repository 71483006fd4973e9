"""Preprocessing that travels with the model: the artifact stores it, evaluation and serving apply it.

Numpy + Pillow only, so the serving image needs no torch.

Example:
    >>> p = Preprocessing(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,))
    >>> p.from_uint8(np.zeros((2, 28, 28), np.uint8)).shape
    (2, 1, 28, 28)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from .checkpoint import LoadedModel
    from .recipe import ModelConfig

_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_size: tuple[int, int, int] = Field(description="(channels, height, width)")
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = Field(1.0, gt=0, le=1.0)
    class_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "Preprocessing":
        c = self.input_size[0]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} values for {c} input channels, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW in [0, 1] -> normalized float32 NCHW."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32, copy=False)

    def from_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N,H,W) or (N,H,W,C) already at any size -> model input NCHW float32.

        Images not at the model's size go through the same PIL resize/crop as files do.
        """
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:3] != self.size:
            from PIL import Image

            mode = "L" if images.shape[-1] == 1 else "RGB"
            images = np.stack([self._pil_to_hwc(Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode))
                               for im in images])
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        x = self._match_channels(x)
        return self.normalize(x)

    def from_pil(self, image) -> np.ndarray:
        """One PIL image of any mode -> model input (1,C,H,W). Handles L/LA/P/RGBA/CMYK/I;16."""
        hwc = self._pil_to_hwc(to_model_mode(image, self.channels))
        x = hwc.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        return self.normalize(self._match_channels(x))

    def _pil_to_hwc(self, image) -> np.ndarray:
        """Resize the shorter side to size/crop_pct, then centre-crop to the model's size (timm eval)."""
        h, w = self.size
        scale_h, scale_w = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        iw, ih = image.size
        if (iw, ih) != (w, h):
            ratio = max(scale_h / ih, scale_w / iw)
            nw, nh = max(w, round(iw * ratio)), max(h, round(ih * ratio))
            image = image.resize((nw, nh), _PIL_FILTERS[self.interpolation])
            left, top = (nw - w) // 2, (nh - h) // 2
            image = image.crop((left, top, left + w, top + h))
        arr = np.asarray(image, dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr

    def _match_channels(self, x: np.ndarray) -> np.ndarray:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1:
            return np.repeat(x, self.channels, axis=1)
        if self.channels == 1:  # ITU-R 601-2 luma, the same weights PIL's convert("L") uses
            return (x[:, :1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114).astype(np.float32)
        raise ValueError(f"cannot map {c} image channels to {self.channels} model channels")

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> "Preprocessing":
        return cls.model_validate(json.loads(Path(path).read_text()))


def to_model_mode(image, channels: int):
    """Convert any PIL mode (P, LA, RGBA, CMYK, I;16, I, F, 1) to 'L' or 'RGB' correctly.

    Alpha is composited on white (what a viewer shows), 16-bit is scaled rather than clipped.
    """
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


# --- resolving: what the file says, what the recipe says, timm's defaults ---------------------------------------

def resolve_preprocessing(loaded: "LoadedModel", cfg: "ModelConfig | None" = None,
                          notes: list[str] | None = None) -> Preprocessing:
    """Preprocessing for ``loaded``: recipe fields win, then the file's hints, then timm's defaults.

    A size, mean or std that only timm's default supplied is said in ``notes`` (a model trained at 28x28 and
    run at timm's 224x224 with ImageNet statistics scores like a random one, without any error).

    Example:
        >>> resolve_preprocessing(loaded, ModelConfig(input_size=32)).input_size
        (1, 32, 32)
    """
    from timm.data import resolve_data_config

    from .errors import CheckpointError
    from .recipe import ModelConfig

    cfg = cfg if cfg is not None else ModelConfig()
    channels = loaded.in_chans
    if cfg.in_chans and cfg.in_chans != channels:
        raise CheckpointError(f"the recipe says in_chans={cfg.in_chans} but the loaded model takes {channels}",
                              fix="pass the same --in-chans when loading the checkpoint")
    hints = loaded.hints
    timm_cfg = resolve_data_config({}, model=loaded.model)

    notes = notes if notes is not None else []
    size = cfg.input_size or tuple(hints.get("input_size") or timm_cfg["input_size"])[1:]
    if not cfg.input_size and not hints.get("input_size"):
        notes.append(f"input size {size[0]}x{size[1]} is timm's default for {loaded.arch}, not read from the file: "
                     "pass --input-size HxW if the model was trained at another size")
    # mean and std come as a pair from one source; recipe values then override each one.
    stats = hints if "mean" in hints and "std" in hints else timm_cfg
    if not (cfg.mean and cfg.std) and stats is timm_cfg:
        notes.append(f"mean/std are not in the file: using timm's defaults for {loaded.arch} ({_fmt(stats['mean'])} / "
                     f"{_fmt(stats['std'])}); pass --mean and --std if the model was trained with other statistics")
    mean = _user_per_channel(cfg.mean, channels, "mean") if cfg.mean else _per_channel(stats["mean"], channels)
    std = _user_per_channel(cfg.std, channels, "std") if cfg.std else _per_channel(stats["std"], channels)
    interpolation = cfg.interpolation or hints.get("interpolation") or timm_cfg.get("interpolation")
    if interpolation not in _PIL_FILTERS:
        interpolation = "bicubic"  # timm's default, for its filters we do not implement (lanczos, box, ...)
    # timm's eval crop can exceed 1 (test_crop_pct); we never upsample-then-pad, so cap at a full view.
    crop_pct = cfg.crop_pct or min(float(hints.get("crop_pct") or timm_cfg.get("crop_pct") or 1.0), 1.0)

    class_names = cfg.class_names or loaded.class_names or [f"class_{i}" for i in range(loaded.num_classes)]
    if len(class_names) != loaded.num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a model with {loaded.num_classes} classes",
                              fix=f"give exactly {loaded.num_classes} class names, or the right --num-classes")
    try:
        return Preprocessing(input_size=(channels, int(size[0]), int(size[1])), mean=mean, std=std,
                             interpolation=interpolation, crop_pct=crop_pct, class_names=list(class_names))
    except ValueError as err:
        reason = " ".join(str(err).split()).rstrip(".")
        raise CheckpointError(f"invalid preprocessing: {reason}",
                              fix="check model.mean/std/input_size in the recipe") from None


def _fmt(values) -> str:
    return ", ".join(f"{float(v):.3g}" for v in values)


def _per_channel(values, channels: int) -> tuple[float, ...]:
    """timm/file statistics for another channel count: the average, once per channel (3 RGB -> 1 gray)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def _user_per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(float(v) for v in values)
    if len(values) == 1:
        return (float(values[0]),) * channels
    from .errors import CheckpointError

    raise CheckpointError(f"the recipe's {what} has {len(values)} values but the model takes {channels} channels",
                          fix=f"give 1 or {channels} {what} values")
