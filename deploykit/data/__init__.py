"""Labelled image sets, the dataset registry, and the splits a compression run needs.

A dataset is one module in this package that registers a :class:`DatasetSpec` (see ``digits.py``):
``resolve_data``, the CLI's ``--data`` help and the checkpoint's recorded dataset all read ``DATASETS``,
so no list elsewhere has to learn the new name. A ``--data`` value that is not a registered name is an
ImageFolder directory.

Example:
    >>> splits = resolve_data(DataConfig(name="fashion-mnist", calibration_images=256))
    >>> len(splits.eval), splits.eval.class_names[0]
    (10000, 'T-shirt/top')
    >>> dataset_names()
    ['digits', 'fashion-mnist', 'fashion-mnist-lt']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import DataError, RecipeError
from ..registry import Registry


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
        from ..stop import check_stop

        for start in range(0, len(self), batch_size):
            check_stop()  # a SIGTERM stops a long evaluation between batches, not inside a runtime's call
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


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``load(cfg)`` returns (train, test): calibration/fine-tuning images come from
    train, reported accuracy from test. Module top levels stay light: heavy imports go inside ``load``."""

    name: str
    description: str  # one short phrase, shown in `deploykit compress --help`
    num_classes: int
    load: Callable[..., tuple["ImageSet", "ImageSet"]]
    install_hint: str = ""  # how to get the data or its library when it is missing
    available: Callable[[], bool] = lambda: True  # cheap check (no loading); tests skip what is not installed


# Every module of this package except these registers datasets; they are imported on first lookup.
DATASETS: Registry[DatasetSpec] = Registry("dataset", package=__name__, skip=("imagefolder", "synthetic"))


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def dataset_names() -> list[str]:
    """Registered dataset names, sorted (what ``--data`` accepts besides an ImageFolder path and 'none')."""
    return DATASETS.names()


def data_help() -> str:
    """One phrase for error fixes and help texts, e.g. 'an ImageFolder path, or one of: digits, fashion-mnist'."""
    return f"an ImageFolder path, or one of: {', '.join(dataset_names())}"


def describe_datasets() -> str:
    """'digits (…); fashion-mnist (…); …': the registered names with their descriptions, for help texts."""
    return "; ".join(f"{name} ({spec.description})" for name, spec in sorted(DATASETS.items()))


def __getattr__(name: str):
    if name == "BUILTIN":  # the old tuple of names; new code calls dataset_names()
        return tuple(dataset_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _looks_like_path(name: str) -> bool:
    return (os.sep in name or "/" in name or name.startswith((".", "~")) or Path(name).expanduser().exists())


def _unknown(name: str) -> DataError:
    """One line: the close registered names (the registry's own hint), then what --data takes."""
    try:
        DATASETS.get(name)
        close = None
    except RecipeError as err:
        close = err.fix if err.fix and err.fix.startswith("did you mean") else None
    return DataError(f"unknown dataset {name!r} (not a registered name, and no such directory)",
                     fix=f"{close} (--data takes {data_help()})" if close else f"pass --data {data_help()}")


def registered_name(name: str | None) -> str | None:
    """A dataset name as timm's train.py records it (``torch/fashion_mnist``, ``FashionMNIST``) -> a registered name.

    Example:
        >>> registered_name("torch/fashion_mnist"), registered_name("imagenet")
        ('fashion-mnist', None)
    """
    if not name:
        return None
    text = str(name).strip()
    for prefix in ("torch/", "tfds/", "hfds/", "hfids/", "wds/"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
    key = text.lower().replace("_", "-").replace(" ", "-")
    aliases = {n.replace("-", ""): n for n in dataset_names()}
    return key if key in DATASETS else aliases.get(key.replace("-", ""))


# Fewer evaluation images than this make a class's F1 noise (one image moves it by 10+ points).
MIN_EVAL_IMAGES_PER_CLASS = 10


def sparse_class_notes(splits: "DataSplits", empty: list[str] = ()) -> list[str]:
    """Warnings for classes whose per-class F1 cannot be trusted: empty, or with few evaluation images."""
    counts = np.bincount(splits.eval.labels, minlength=splits.eval.num_classes)
    few = [(splits.eval.class_names[c], int(n)) for c, n in enumerate(counts) if n < MIN_EVAL_IMAGES_PER_CLASS]
    notes = []
    if empty:
        notes.append(f"{len(empty)} class folder(s) hold no images: {', '.join(empty[:10])}"
                     + (" ..." if len(empty) > 10 else "") + "; the model still predicts them")
    if few:
        shown = ", ".join(f"{name} ({n})" for name, n in few[:10]) + (" ..." if len(few) > 10 else "")
        notes.append(f"{len(few)} class(es) have fewer than {MIN_EVAL_IMAGES_PER_CLASS} evaluation images, so their "
                     f"per-class F1 is noise: {shown}")
    return notes


def resolve_data(cfg) -> DataSplits | None:
    """DataConfig -> DataSplits; None when cfg.name is None or 'none' (the data-free path).

    A registered name loads that dataset; anything else is an ImageFolder directory.
    """
    if cfg.name in (None, "none"):
        return None
    name, empty = str(cfg.name), []
    if name in DATASETS:
        train, test = DATASETS.get(name).load(cfg)
    elif _looks_like_path(name):
        from .imagefolder import empty_classes, load_imagefolder_splits

        train, test = load_imagefolder_splits(Path(name).expanduser(), seed=cfg.seed)
        empty = empty_classes(train, test)
    elif alias := registered_name(name):
        return resolve_data(cfg.model_copy(update={"name": alias}))
    else:
        raise _unknown(name)
    # Calibrate on training images, evaluate on the held-out split: never calibrate on what is scored.
    calibration = train.head(cfg.calibration_images, seed=cfg.seed, name=f"{name}:calibration")
    splits = DataSplits(name=name, train=train, calibration=calibration,
                        eval=test.head(cfg.eval_images, seed=cfg.seed, name=f"{name}:eval"))
    splits.notes.extend(sparse_class_notes(splits, empty))
    return splits


def check_fits(splits: DataSplits, num_classes: int) -> None:
    if splits.eval.num_classes != num_classes:
        raise DataError(
            f"dataset {splits.name!r} has {splits.eval.num_classes} classes but the model predicts {num_classes}",
            fix="pass data with the model's classes, or --num-classes to match the checkpoint",
        )
