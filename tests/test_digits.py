"""The "digits" dataset (scikit-learn's 8x8 handwritten digits), reached only through the registry."""

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the digits dataset ships inside scikit-learn")

from deploykit.data import DATASETS, resolve_data  # noqa: E402
from deploykit.preprocessing import Preprocessing  # noqa: E402
from deploykit.recipe import DataConfig  # noqa: E402

TOTAL, PER_CLASS = 1797, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn.datasets.load_digits


def _splits(seed=0):
    return resolve_data(DataConfig(name="digits", seed=seed))


def test_digits_is_registered_and_resolves_to_real_images():
    assert "digits" in DATASETS.names()
    s = _splits()
    assert s.name == "digits" and s.class_names == [str(i) for i in range(10)]
    assert len(s.train) + len(s.eval) == TOTAL and len(s.eval) == 360
    for split in (s.train, s.eval):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8)
        assert split.labels.dtype == np.int64 and split.num_classes == 10
    pixels = np.concatenate([s.train.images, s.eval.images])
    assert pixels.min() == 0 and pixels.max() == 255  # 0..16 scaled to the full uint8 range
    assert set(np.unique(pixels).tolist()) <= {round(v * 255 / 16) for v in range(17)}


def test_stratified_split_keeps_every_class_in_proportion():
    s = _splits()
    train, test = np.bincount(s.train.labels, minlength=10), np.bincount(s.eval.labels, minlength=10)
    assert (train + test).tolist() == PER_CLASS
    assert np.all(np.abs(test - np.asarray(PER_CLASS) * 0.2) <= 1)


def test_train_and_test_are_disjoint_and_seeded():
    a, b, c = _splits(0), _splits(0), _splits(1)
    # train + test is a partition of load_digits(): every image (with its label) used exactly once
    from sklearn.datasets import load_digits

    ds = load_digits()
    full = np.column_stack([np.rint(ds.images.reshape(TOTAL, -1) * 255 / 16), ds.target]).astype(np.int64)
    used = np.column_stack([np.concatenate([a.train.images, a.eval.images]).reshape(TOTAL, -1),
                            np.concatenate([a.train.labels, a.eval.labels])]).astype(np.int64)
    full_rows, full_counts = np.unique(full, axis=0, return_counts=True)
    used_rows, used_counts = np.unique(used, axis=0, return_counts=True)
    assert np.array_equal(full_rows, used_rows) and np.array_equal(full_counts, used_counts)
    assert np.array_equal(a.eval.images, b.eval.images) and np.array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.eval.images, c.eval.images)


def test_a_model_input_can_be_built_from_digits():
    s = _splits()
    pre = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    x, y = next(s.eval.batches(pre, batch_size=16))
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32 and y.shape == (16,)
    assert np.isfinite(x).all() and x.min() >= (0 - 0.5) / 0.25 and x.max() <= (1 - 0.5) / 0.25
    gray = Preprocessing(input_size=(1, 8, 8), mean=(0.0,), std=(1.0,))
    assert np.allclose(gray.from_uint8(s.eval.images[:4])[:, 0], s.eval.images[:4] / 255.0)
