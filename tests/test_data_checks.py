"""What is checked about the user's data and weights before any heavy stage: every bad image named at once,
classes whose F1 is noise, timm's dataset names, an EMA that never warmed up."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deploykit.data import registered_name


def _folder(root, counts):
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (12, 12), color=i * 20).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("recorded, name", [("torch/fashion_mnist", "fashion-mnist"), ("FashionMNIST", "fashion-mnist"),
                                            ("fashion-mnist-lt", "fashion-mnist-lt"), ("torch/digits", "digits"),
                                            ("imagenet", None), ("", None)])
def test_timm_dataset_names_map_to_registered_ones(recorded, name):
    assert registered_name(recorded) == name


def test_every_bad_image_is_named_before_any_stage_runs(tmp_path):
    from helpers import save_tiny_checkpoint

    root = _folder(tmp_path / "ds", {"a": 4, "b": 4})
    (root / "a" / "broken.png").write_bytes(Image.new("L", (8, 8)).tobytes()[:10])  # not a PNG at all
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])                  # a truncated PNG
    save_tiny_checkpoint(tmp_path / "t.pth", num_classes=2)
    res = subprocess.run([sys.executable, "-m", "deploykit", "compress", "t.pth", "--data", "ds", "--fp32"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    err = " ".join(res.stderr.split())
    assert "2 of 10 files under ds are not readable images: a/broken.png" in err and "b/cut.png" in err, err
    assert "done fuse_bn" not in err and not (tmp_path / "t.deploykit").exists()


def test_sparse_and_empty_classes_are_warned_about(tmp_path):
    from deploykit.data import resolve_data
    from deploykit.recipe import DataConfig

    root = _folder(tmp_path / "ds", {"common": 60, "rare": 5, "gone": 0})
    splits = resolve_data(DataConfig(name=str(root)))
    notes = " ".join(splits.notes)
    assert "1 class folder(s) hold no images: gone" in notes
    assert "2 class(es) have fewer than 10 evaluation images" in notes and "rare (1)" in notes and "gone (0)" in notes
    assert "common" not in notes


def test_an_ema_that_never_warmed_up_is_warned_about(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    import deploykit
    from deploykit.checkpoint import save_timm_checkpoint
    from deploykit.data import resolve_data
    from deploykit.preprocessing import Preprocessing
    from deploykit.recipe import DataConfig

    # a model that has learned digits (60 steps: ~80% top-1), and an "EMA" that is still the initialisation (~10%)
    torch.manual_seed(0)
    kwargs = {"channels": (8, 8, 16, 16)}
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, **kwargs)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    data = resolve_data(DataConfig(name="digits"))
    pre = Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    x, y = torch.from_numpy(data.train.load(pre, np.arange(len(data.train)))), torch.from_numpy(data.train.labels)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for step in range(60):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    save_timm_checkpoint(tmp_path / "t.pth", arch="resnet10t", state_dict=model.state_dict(), state_dict_ema=ema,
                         args={"model": "resnet10t", "model_kwargs": kwargs, "input_size": (1, 16, 16),
                               "mean": (0.5,), "std": (0.5,)})
    res = deploykit.compress(tmp_path / "t.pth", "fp32", out=tmp_path / "t.deploykit", data__name="digits",
                             eval__enabled=False)
    warning = " ".join(n for n in res.report["notes"] if "EMA" in n)
    assert "the EMA weights score" in warning and "pass --weights model" in warning, res.report["notes"]
    from deploykit.sanity import ema_vs_model
    from deploykit.checkpoint import load_checkpoint

    assert ema_vs_model(load_checkpoint(tmp_path / "t.pth", weights="model"), data, pre) is None  # nothing to compare
