"""Datasets: the registry (every registered dataset), Fashion-MNIST(-LT), ImageFolder, and clear errors for bad data."""

import numpy as np
import pytest
from PIL import Image

from deploykit.data import DATASETS, data_help, dataset_names, resolve_data
from deploykit.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, long_tail_counts
from deploykit.data.imagefolder import load_imagefolder_splits
from deploykit.errors import DataError, DeployKitError
from deploykit.recipe import DataConfig


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_resolves_to_labelled_splits(name):
    spec = DATASETS.get(name)
    assert spec.name == name and spec.description and spec.install_hint
    if not spec.available():
        pytest.skip(f"{name} is not installed here: {spec.install_hint}")
    s = resolve_data(DataConfig(name=name, calibration_images=64, eval_images=200))
    assert s.name == name and len(s.class_names) == spec.num_classes
    for split in (s.train, s.calibration, s.eval):
        assert len(split) > 0 and split.class_names == s.class_names
        assert split.labels.min() >= 0 and split.labels.max() < spec.num_classes
        if split.images is not None:
            assert split.images.dtype == np.uint8 and len(split.images) == len(split)
    assert len(np.unique(s.train.labels)) == spec.num_classes  # every class can be calibrated and fine-tuned on
    assert len(s.calibration) == min(64, len(s.train)) and len(s.eval) <= 200


def test_registry_feeds_names_and_help():
    names = dataset_names()
    assert names == DATASETS.names() and {"fashion-mnist", "fashion-mnist-lt", "digits"} <= set(names)
    assert all(n in data_help() for n in names) and "ImageFolder" in data_help()
    import deploykit.data as data

    assert data.BUILTIN == tuple(names)  # the old constant, kept for callers not yet moved to dataset_names()


@pytest.mark.parametrize("name, close", [("fashon-mnist", "did you mean fashion-mnist"),
                                         ("digit", "did you mean digits"),
                                         ("flowers", "pass --data an ImageFolder path")])
def test_unknown_dataset_name_fails_in_one_line(tmp_path, monkeypatch, name, close):
    monkeypatch.chdir(tmp_path)  # so the bare name is not an existing directory
    with pytest.raises(DataError, match=f"unknown dataset '{name}'") as err:
        resolve_data(DataConfig(name=name))
    msg = str(err.value)
    assert "\n" not in msg and close in msg and all(n in msg for n in dataset_names())
    assert isinstance(err.value, DeployKitError)


def test_a_path_that_is_not_a_name_is_an_imagefolder(tmp_path, monkeypatch):
    _folder(tmp_path / "flowers", ["rose", "tulip"], n=5)
    monkeypatch.chdir(tmp_path)
    s = resolve_data(DataConfig(name="flowers", calibration_images=4))  # a bare existing directory
    assert s.class_names == ["rose", "tulip"] and len(s.calibration) == 4
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(DataConfig(name=str(tmp_path / "missing")))


def test_fashion_mnist_splits_are_real_and_balanced():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.class_names == CLASS_NAMES
    assert abs(train.images.mean() / 255 - 0.2860) < 1e-3  # the reference model's normalisation constant


def test_long_tailed_variant_has_ratio_100_and_balanced_test():
    lt = load_fashion_mnist("train", long_tailed=True)
    counts = np.bincount(lt.labels)
    assert counts.tolist() == long_tail_counts(6000, 10, 100.0)
    assert counts[0] / counts[-1] == 100
    assert np.all(np.diff(counts) < 0)


def test_resolve_data_never_calibrates_on_eval_images():
    s = resolve_data(DataConfig(name="fashion-mnist", calibration_images=100, eval_images=500))
    assert len(s.calibration) == 100 and len(s.eval) == 500
    assert s.calibration.name.endswith("calibration") and s.train.name.endswith(":train")
    assert resolve_data(DataConfig(name=None)) is None


def _folder(root, classes, n=3, size=(20, 16), mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, color=(i * 40) if mode == "L" else (i * 40, 10, 200)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_split_is_seeded_and_disjoint(tmp_path):
    _folder(tmp_path / "ds", ["cat", "dog"], n=10)
    train, ev = load_imagefolder_splits(tmp_path / "ds", seed=0)
    assert train.class_names == ["cat", "dog"] and len(train) + len(ev) == 20
    assert not set(map(str, train.paths)) & set(map(str, ev.paths))
    assert sorted(np.bincount(ev.labels).tolist()) == [2, 2]


def test_imagefolder_with_train_val(tmp_path):
    _folder(tmp_path / "ds" / "train", ["a", "b"], n=4)
    _folder(tmp_path / "ds" / "val", ["a", "b"], n=2)
    train, ev = load_imagefolder_splits(tmp_path / "ds")
    assert (len(train), len(ev)) == (8, 4)


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, r"does not exist.*Fix: pass --data"),
    (lambda p: p.mkdir(), r"has no class sub-directories"),
    (lambda p: (p / "a").mkdir(parents=True), r"contains no image files"),
    (lambda p: ((p / "a").mkdir(parents=True), (p / "a" / "x.jpg").write_text("not an image")),
     r"1 of 1 files under .* are not readable images: a/x\.jpg \(UnidentifiedImageError\)"),
])
def test_bad_imagefolders_fail_clearly(tmp_path, setup, match):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=match):
        load_imagefolder_splits(root)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    from deploykit.data import fashion_mnist

    monkeypatch.setenv("DEPLOYKIT_FASHION_MNIST_DIR", str(tmp_path))
    fashion_mnist._load_split.cache_clear()
    try:
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
            load_fashion_mnist("test")
    finally:
        fashion_mnist._load_split.cache_clear()
