"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (60k train / 10k test, 28x28, 10 classes).

``long_tailed=True`` gives Fashion-MNIST-LT: the training split subsampled so per-class counts decay
exponentially with imbalance ratio 100 (the CIFAR-10-LT convention, Cao et al. 2019); the test split
stays balanced.

Registers two datasets: "fashion-mnist" and "fashion-mnist-lt" (same test split, long-tailed training split).

Example:
    >>> ds = load_fashion_mnist("test")
    >>> ds.images.shape, ds.num_classes
    ((10000, 28, 28), 10)
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import DatasetSpec, ImageSet, register_dataset

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
# Training-split statistics of the pixels in [0, 1]; used as the reference model's mean/std.
MEAN, STD = 0.2860, 0.3530
INSTALL_HINT = "apt-get install dataset-fashion-mnist (or set DEPLOYKIT_FASHION_MNIST_DIR)"


def data_dir() -> Path:
    return Path(os.environ.get("DEPLOYKIT_FASHION_MNIST_DIR", DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file {path} not found", fix=INSTALL_HINT) from None
    except (OSError, EOFError) as err:
        raise DataError(f"Fashion-MNIST file {path} is corrupt ({err})",
                        fix="reinstall: apt-get install --reinstall dataset-fashion-mnist") from None
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=4)
def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    d = data_dir()
    return _read_idx(d / f"{prefix}-images-idx3-ubyte.gz"), _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """n_i = n_max * imbalance^(-i/(C-1)): class 0 keeps n_max, the last keeps n_max/imbalance."""
    return [int(n_max * imbalance ** (-i / (num_classes - 1))) for i in range(num_classes)]


def load_fashion_mnist(split: str = "train", long_tailed: bool = False, imbalance: float = 100.0,
                       seed: int = 0) -> ImageSet:
    if split not in ("train", "test"):
        raise DataError(f"unknown Fashion-MNIST split {split!r}", fix="use 'train' or 'test'")
    images, labels = _load_split(split)
    name = "fashion-mnist"
    if long_tailed and split == "train":
        rng = np.random.default_rng(seed)
        counts = long_tail_counts(int(np.bincount(labels).max()), len(CLASS_NAMES), imbalance)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)])
        keep.sort()
        images, labels = images[keep], labels[keep]
        name = "fashion-mnist-lt"
    return ImageSet(name=f"{name}:{split}", class_names=list(CLASS_NAMES), labels=labels, images=images)


def available() -> bool:
    d = data_dir()
    return all((d / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


def _splits(long_tailed: bool):
    def load(cfg) -> tuple[ImageSet, ImageSet]:
        return load_fashion_mnist("train", long_tailed=long_tailed, seed=cfg.seed), load_fashion_mnist("test")

    return load


register_dataset(DatasetSpec("fashion-mnist", "Fashion-MNIST, 28x28 grey clothing, 10 classes, 60k/10k",
                             num_classes=len(CLASS_NAMES), load=_splits(False), install_hint=INSTALL_HINT,
                             available=available))
register_dataset(DatasetSpec("fashion-mnist-lt", "fashion-mnist with a long-tailed train split, ratio 100",
                             num_classes=len(CLASS_NAMES), load=_splits(True), install_hint=INSTALL_HINT,
                             available=available))
