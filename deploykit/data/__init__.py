"""Labelled image sets and the splits a compression run needs.

Example:
    >>> splits = resolve_data(DataConfig(name="fashion-mnist", calibration_images=256))
    >>> len(splits.eval), splits.eval.class_names[0]
    (10000, 'T-shirt/top')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError

BUILTIN = ("fashion-mnist", "fashion-mnist-lt")


@dataclass
class ImageSet:
    """Labelled images held as uint8 arrays (N,H,W[,C]) or as file paths; preprocessed lazily."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if n != len(self.labels):
            raise ValueError(f"{self.name}: {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            name=name or self.name,
            class_names=self.class_names,
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
        )

    def head(self, n: int | None, seed: int = 0, name: str | None = None) -> "ImageSet":
        """A seeded random subset of ``n`` images (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return self.subset(idx, name)

    def load(self, pre, indices: np.ndarray) -> np.ndarray:
        """Preprocessed float32 NCHW batch for the given indices."""
        if self.images is not None:
            return pre.from_uint8(self.images[indices])
        from .imagefolder import open_image

        return np.concatenate([pre.from_pil(open_image(self.paths[i])) for i in indices])

    def batches(self, pre, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            yield self.load(pre, idx), self.labels[idx]


@dataclass
class DataSplits:
    """train (for fine-tuning stages), calibration (PTQ), eval (reported accuracy; never trained on)."""

    name: str
    train: ImageSet
    calibration: ImageSet
    eval: ImageSet
    notes: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return self.eval.class_names


def resolve_data(cfg) -> DataSplits | None:
    """DataConfig -> DataSplits; None when cfg.name is None or 'none' (the data-free path)."""
    if cfg.name in (None, "none"):
        return None
    if cfg.name in BUILTIN:
        from .fashion_mnist import load_fashion_mnist

        train = load_fashion_mnist("train", long_tailed=cfg.name.endswith("-lt"), seed=cfg.seed)
        test = load_fashion_mnist("test")
        name = cfg.name
    else:
        from .imagefolder import load_imagefolder_splits

        train, test = load_imagefolder_splits(Path(cfg.name), seed=cfg.seed)
        name = str(cfg.name)
    # Calibrate on training images, evaluate on the held-out split: never calibrate on what is scored.
    calibration = train.head(cfg.calibration_images, seed=cfg.seed, name=f"{name}:calibration")
    return DataSplits(name=name, train=train, calibration=calibration,
                      eval=test.head(cfg.eval_images, seed=cfg.seed, name=f"{name}:eval"))


def check_fits(splits: DataSplits, num_classes: int) -> None:
    if splits.eval.num_classes != num_classes:
        raise DataError(
            f"dataset {splits.name!r} has {splits.eval.num_classes} classes but the model predicts {num_classes}",
            fix="pass data with the model's classes, or --num-classes to match the checkpoint",
        )
