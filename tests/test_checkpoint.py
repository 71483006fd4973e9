"""Checkpoint loading: every format round-trips to the same outputs, every bad file fails in one clear line."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from deploykit.checkpoint import LoadedModel, load_checkpoint, save_timm_checkpoint
from deploykit.preprocessing import resolve_preprocessing
from deploykit.errors import CheckpointError
from deploykit.recipe import ModelConfig

ARCH = "resnet10t"
TINY = {"channels": [8, 16, 32, 64]}  # a ~50k-parameter resnet10t keeps the whole file fast
ARGS = {"num_classes": 10, "in_chans": 1, "model_kwargs": TINY, "input_size": [1, 32, 32],
        "mean": [0.25], "std": [0.5], "interpolation": "bilinear", "crop_pct": 1.0}
CLASSES = [f"c{i}" for i in range(10)]


def tiny_model(seed: int = 0, num_classes: int = 10, in_chans: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, in_chans=in_chans, **TINY)
    # Non-default BatchNorm statistics, so a load that skips buffers changes the outputs.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: extra intra-op threads only spin against whatever else shares the 2 cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_model(loaded: LoadedModel, reference: torch.nn.Module, x: torch.Tensor) -> None:
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters())
    torch.testing.assert_close(outputs(loaded.model, x), outputs(reference, x))


# --- formats -------------------------------------------------------------------------------------------------------


def test_timm_train_checkpoint_prefers_ema(tmp_path, source, x):
    ema = copy.deepcopy(source)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "train.pth"
    save_timm_checkpoint(path, arch=ARCH, state_dict=source.state_dict(), state_dict_ema=ema, args=ARGS,
                         class_names=CLASSES, extra={"epoch": 7, "metric": 91.5})

    loaded = load_checkpoint(path)

    assert (loaded.arch, loaded.num_classes, loaded.in_chans, loaded.weights) == (ARCH, 10, 1, "state_dict_ema")
    assert any(n.startswith("using EMA weights (state_dict_ema)") for n in loaded.notes)
    assert_same_model(loaded, ema, x)
    assert not torch.allclose(outputs(loaded.model, x), outputs(source, x))
    assert loaded.class_names == CLASSES
    assert loaded.model_kwargs == TINY
    assert loaded.hints == {"input_size": (1, 32, 32), "mean": (0.25,), "std": (0.5,),
                            "interpolation": "bilinear", "crop_pct": 1.0}
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_checkpoint_without_ema_uses_state_dict(tmp_path, source, x):
    path = tmp_path / "train.pth"
    save_timm_checkpoint(path, arch=ARCH, state_dict=source.state_dict(), args={"model_kwargs": TINY})
    loaded = load_checkpoint(path)  # num_classes / in_chans are None in args: read off the weights
    assert loaded.weights == "state_dict"
    assert (loaded.num_classes, loaded.in_chans) == (10, 1)
    assert "num_classes=10 inferred from fc.weight" in loaded.notes
    assert "in_chans=1 inferred from conv1.0.weight" in loaded.notes
    assert_same_model(loaded, source, x)


@pytest.mark.parametrize("wrap, prefix, weights", [
    (lambda sd: sd, "", "state_dict (root)"),
    (lambda sd: {"model": sd, "epoch": 3}, "", "model"),
    (lambda sd: {"state_dict": sd}, "module.", "state_dict"),
    (lambda sd: sd, "_orig_mod.", "state_dict (root)"),
    (lambda sd: sd, "module._orig_mod.", "state_dict (root)"),
], ids=["plain", "model-key", "ddp", "compiled", "ddp+compiled"])
def test_state_dict_files_with_arch_kwarg(tmp_path, source, x, wrap, prefix, weights):
    path = tmp_path / "weights.pth"
    torch.save(wrap({prefix + k: v for k, v in source.state_dict().items()}), path)

    loaded = load_checkpoint(path, arch=ARCH, model_kwargs=TINY)

    assert (loaded.arch, loaded.weights, loaded.num_classes, loaded.in_chans) == (ARCH, weights, 10, 1)
    n = len(source.state_dict())
    for part in filter(None, prefix.split(".")):
        assert f"stripped '{part}.' prefix from {n} keys" in loaded.notes
    assert_same_model(loaded, source, x)


@pytest.mark.parametrize("metadata, arch", [(None, ARCH), ({"arch": ARCH}, None), (None, f"timm/{ARCH}.c3_in1k")],
                         ids=["arch-kwarg", "arch-in-metadata", "hub-id"])
def test_safetensors(tmp_path, source, x, metadata, arch):
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path), metadata=metadata)
    loaded = load_checkpoint(path, arch=arch, model_kwargs=TINY)
    assert loaded.weights == "safetensors"
    assert loaded.arch.split(".")[0] == ARCH
    assert_same_model(loaded, source, x)


def test_arch_kwarg_overrides_file_and_fixes_unknown_arch(tmp_path, source, x):
    # timm's CheckpointSaver without args writes the class name ("resnet"), which is no timm model.
    path = tmp_path / "saver.pth"
    torch.save({"arch": "resnet", "state_dict": source.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"unknown architecture 'resnet' \(from the file\).*--arch"):
        load_checkpoint(path, model_kwargs=TINY)
    loaded = load_checkpoint(path, arch=ARCH, model_kwargs=TINY)
    assert "--arch resnet10t overrides the file's arch 'resnet'" in loaded.notes
    assert_same_model(loaded, source, x)


def test_missing_batchnorm_counters_are_tolerated(tmp_path, source, x):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_checkpoint(path, arch=ARCH, model_kwargs=TINY)
    assert any("num_batches_tracked" in n for n in loaded.notes)
    assert_same_model(loaded, source, x)


class TinyNet(torch.nn.Module):
    """A non-timm model, pickled whole."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("make, arch, classes, wrap", [
    (tiny_model, ARCH, 10, lambda m: m),
    (TinyNet, "TinyNet", 5, lambda m: m),
    (TinyNet, "TinyNet", 5, lambda m: {"model": m, "epoch": 3}),
], ids=["timm", "custom", "module-in-dict"])
def test_pickled_module_needs_trust(tmp_path, x, make, arch, classes, wrap):
    model = make().eval()
    path = tmp_path / "whole.pth"
    torch.save(wrap(model), path)

    refused = r"pickles Python objects \(.*{}\), and unpickling them can execute arbitrary code.*--trust-pickle"
    with pytest.raises(CheckpointError, match=refused.format(type(model).__name__)):
        load_checkpoint(path)

    loaded = load_checkpoint(path, trust_pickle=True)
    assert (loaded.weights, loaded.arch, loaded.num_classes, loaded.in_chans) == ("pickled nn.Module", arch, classes, 1)
    assert_same_model(loaded, model, x)


def test_timm_refusal_names_the_class(tmp_path, source):
    path = tmp_path / "whole.pth"
    torch.save(source, path)
    with pytest.raises(CheckpointError, match=r"\(timm\.models\.resnet\.ResNet\)"):
        load_checkpoint(path)


def test_trusted_pickle_of_missing_code(tmp_path):
    gone = types.ModuleType("dk_vanished_models")
    gone.Net = type("Net", (torch.nn.Linear,), {"__module__": "dk_vanished_models"})
    sys.modules["dk_vanished_models"] = gone
    try:
        torch.save(gone.Net(2, 2), tmp_path / "gone.pth")
    finally:
        del sys.modules["dk_vanished_models"]
    with pytest.raises(CheckpointError, match=r"needs Python code that is not importable here.*dk_vanished_models"):
        load_checkpoint(tmp_path / "gone.pth", trust_pickle=True)


# --- bad files -----------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nope\.pth' not found\. Fix: check the path"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match=r"is a directory"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)\. Fix: "):
        load_checkpoint(tmp_path / "empty.pth", arch=ARCH)


@pytest.mark.parametrize("suffix, cut", [(".pth", 0.5), (".pth", 0.99), (".safetensors", 0.5), (".safetensors", 0.01)],
                         ids=["zip-half", "zip-tail", "safetensors-half", "safetensors-header"])
def test_truncated_file(tmp_path, source, suffix, cut):
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), full)
    else:
        save_file(source.state_dict(), str(full))
    data = full.read_bytes()
    cut_path = tmp_path / f"cut{suffix}"
    cut_path.write_bytes(data[:max(9, int(len(data) * cut))])
    with pytest.raises(CheckpointError, match=r"is truncated or corrupt .*Fix: re-download or re-save"):
        load_checkpoint(cut_path, arch=ARCH, model_kwargs=TINY)


def test_truncated_zip_reports_torch_reason(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"failed finding central directory") as info:
        load_checkpoint(tmp_path / "cut.pth", arch=ARCH)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, looks_like", [
    (b"label,path\n0,img.png\n", "a text file"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)), "a JPEG image"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "a Git LFS pointer"),
    (bytes(range(1, 60)), "unrecognised data"),
], ids=["text", "jpeg", "html", "git-lfs", "binary"])
def test_not_a_checkpoint(tmp_path, content, looks_like):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"is not a PyTorch checkpoint: it looks like {looks_like}"):
        load_checkpoint(path, arch=ARCH)


def test_zip_that_is_not_torch(tmp_path):
    import numpy as np

    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.pth")
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint \(torch: "):
        load_checkpoint(tmp_path / "arrays.pth", arch=ARCH)


@pytest.mark.parametrize("obj, detail", [
    ([1, 2, 3], "it holds a list"),
    ({"epoch": 3, "arch": ARCH}, r"top-level keys: 'epoch', 'arch'"),
    ({"state_dict": {}}, r"top-level keys: 'state_dict'"),
], ids=["list", "dict-without-tensors", "empty-state-dict"])
def test_no_state_dict(tmp_path, obj, detail):
    torch.save(obj, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=rf"holds no state dict.*{detail}.*Fix: save model\.state_dict\(\)"):
        load_checkpoint(tmp_path / "odd.pth", arch=ARCH)


def test_no_arch(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"does not name its architecture\. Fix: pass --arch"):
        load_checkpoint(tmp_path / "w.pth")


def test_unknown_arch_suggests_close_names(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError,
                       match=r"unknown architecture 'resnet10x' \(from --arch\).*close matches: .*resnet10t"):
        load_checkpoint(tmp_path / "w.pth", arch="resnet10x")


def test_shape_mismatch_lists_shapes(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=(
            r"does not fit resnet10t\(num_classes=5, in_chans=1, channels=\[8, 16, 32, 64\]\): 2 shape mismatches "
            r"\(fc\.weight: ckpt \[10, 64\] vs model \[5, 64\]; fc\.bias: ckpt \[10\] vs model \[5\]\), "
            r"its classifier \(fc\.weight\) has 10 outputs, not 5\. Fix: pass --num-classes 10")):
        load_checkpoint(tmp_path / "w.pth", arch=ARCH, num_classes=5, model_kwargs=TINY)


def test_missing_and_unexpected_keys(tmp_path, source):
    state = source.state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key \(fc\.bias \[10\]\), 1 unexpected key "
                                              r"\(extra\.weight \[3, 3\]\)\. Fix: pass the right --arch"):
        load_checkpoint(tmp_path / "w.pth", arch=ARCH, model_kwargs=TINY)


def test_wrong_arch_reports_many_misfits_in_one_line(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"does not fit mobilenetv3_small_050\(\): .*missing keys.*unexpected keys"
                                              r".*probably another architecture") as info:
        load_checkpoint(tmp_path / "w.pth", arch="mobilenetv3_small_050")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, source, bad):
    state = copy.deepcopy(source.state_dict())
    state["fc.weight"][:3, 0] = bad
    save_timm_checkpoint(tmp_path / "w.pth", arch=ARCH, state_dict=state, args=ARGS)
    with pytest.raises(CheckpointError, match=r"has non-finite weights: 3 NaN/Inf values in 'fc\.weight'\. Fix: "):
        load_checkpoint(tmp_path / "w.pth")


def test_bad_model_kwargs(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"could not build resnet10t\(.*TypeError.*Fix: check --arch"):
        load_checkpoint(tmp_path / "w.pth", arch=ARCH, model_kwargs={"no_such_option": 1})


# --- preprocessing -------------------------------------------------------------------------------------------------


def test_preprocessing_from_file_hints(tmp_path, source):
    save_timm_checkpoint(tmp_path / "t.pth", arch=ARCH, state_dict=source, args=ARGS, class_names=CLASSES)
    pre = resolve_preprocessing(load_checkpoint(tmp_path / "t.pth"))
    assert pre.input_size == (1, 32, 32)
    assert (pre.mean, pre.std, pre.interpolation, pre.crop_pct) == ((0.25,), (0.5,), "bilinear", 1.0)
    assert pre.class_names == CLASSES


def test_recipe_overrides_file_hints(tmp_path, source):
    save_timm_checkpoint(tmp_path / "t.pth", arch=ARCH, state_dict=source, args=ARGS, class_names=CLASSES)
    names = [f"n{i}" for i in range(10)]
    cfg = ModelConfig(input_size=48, mean=[0.5], std=[0.2], interpolation="nearest", class_names=names, in_chans=1)
    pre = resolve_preprocessing(load_checkpoint(tmp_path / "t.pth"), cfg)
    assert (pre.input_size, pre.mean, pre.std, pre.interpolation) == ((1, 48, 48), (0.5,), (0.2,), "nearest")
    assert pre.crop_pct == 1.0  # not a recipe field: still the file's
    assert pre.class_names == names


def test_timm_defaults_when_file_says_nothing(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = load_checkpoint(tmp_path / "w.pth", arch=ARCH, model_kwargs=TINY)
    pre = resolve_preprocessing(loaded)
    assert pre.input_size == (1, 176, 176)  # resnet10t's pretrained_cfg
    assert pre.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))  # RGB stats averaged for 1 channel
    assert pre.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    assert (pre.interpolation, pre.crop_pct) == ("bicubic", 0.875)
    assert pre.class_names == [f"class_{i}" for i in range(10)]


def test_preprocessing_rejects_wrong_class_count_and_channels(tmp_path, source):
    save_timm_checkpoint(tmp_path / "t.pth", arch=ARCH, state_dict=source, args=ARGS)
    loaded = load_checkpoint(tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"3 class names for a model with 10 classes\. Fix: give exactly 10"):
        resolve_preprocessing(loaded, ModelConfig(class_names=["a", "b", "c"]))
    with pytest.raises(CheckpointError, match=r"in_chans=3 but the loaded model takes 1"):
        resolve_preprocessing(loaded, ModelConfig(in_chans=3))
    with pytest.raises(CheckpointError, match=r"recipe's mean has 3 values but the model takes 1 channels"):
        resolve_preprocessing(loaded, ModelConfig(mean=[0.1, 0.2, 0.3]))


# --- writing -------------------------------------------------------------------------------------------------------


def test_save_is_atomic_and_loadable_weights_only(tmp_path, source):
    import argparse

    path = tmp_path / "sub" / "t.pth"
    save_timm_checkpoint(path, arch=ARCH, state_dict=source, args=ARGS)
    save_timm_checkpoint(path, arch=ARCH, state_dict=source, args=ARGS)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["t.pth"]  # no temp files left behind
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == ckpt["args"].model == ARCH
    assert ckpt["args"].img_size is None and ckpt["args"].num_classes == 10

    with pytest.raises(CheckpointError, match=r"args\['data_dir'\] is a PosixPath|args\['data_dir'\] is a \w*Path"):
        save_timm_checkpoint(tmp_path / "bad.pth", arch=ARCH, state_dict=source, args={"data_dir": Path("/d")})
    assert not (tmp_path / "bad.pth").exists()


def test_import_does_not_pull_torch():
    code = "import sys, deploykit.checkpoint; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
