"""scikit-learn's handwritten digits (UCI optdigits): 1,797 real 8x8 grey images, 10 classes, no download.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``). Pixel counts 0-16 are scaled to
uint8 0-255; a seeded, stratified 80/20 split gives train (1,437) and test (360) with every class in both.

Example:
    >>> train, test = load_digits_splits(seed=0)
    >>> train.images.shape, test.images.shape, test.class_names[:3]
    ((1437, 8, 8), (360, 8, 8), ['0', '1', '2'])
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import numpy as np

from ..errors import DataError
from . import DatasetSpec, ImageSet, register_dataset

CLASS_NAMES = [str(i) for i in range(10)]
INSTALL_HINT = "pip install scikit-learn (it ships the digits images)"
TEST_FRACTION = 0.2


def available() -> bool:
    return importlib.util.find_spec("sklearn") is not None


@lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' dataset needs scikit-learn", fix=INSTALL_HINT) from None
    ds = load_digits()
    images = np.rint(ds.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return images, ds.target.astype(np.int64)


def load_digits_splits(seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets; the stratified split is a function of ``seed`` only."""
    from sklearn.model_selection import train_test_split

    images, labels = _load_all()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
                                           random_state=seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (ImageSet("digits:train", list(CLASS_NAMES), labels[train_idx], images=images[train_idx]),
            ImageSet("digits:test", list(CLASS_NAMES), labels[test_idx], images=images[test_idx]))


register_dataset(DatasetSpec("digits", "scikit-learn handwritten digits, 8x8 grey, 10 classes, 1,797 images",
                             num_classes=len(CLASS_NAMES), load=lambda cfg: load_digits_splits(cfg.seed),
                             install_hint=INSTALL_HINT, available=available))
