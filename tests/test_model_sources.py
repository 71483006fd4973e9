"""The models users bring: their own nn.Module (factory or Python object), SWA / Lightning / CheckpointSaver /
compiled+DDP files, EMA-or-model choice, non-square and transformer input sizes — through the real CLI."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("sklearn")  # the digits dataset

NETS = textwrap.dedent('''
    import torch.nn as nn

    class TinyNet(nn.Module):
        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.fc(self.features(x))

    def make(num_classes=10, width=8):
        return TinyNet(num_classes, width)

    def broken(**kw):
        raise RuntimeError("no GPU here")

    def not_a_model():
        return 42
''')


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "deploykit", "compress", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _onnx_logits(art, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(art / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture()
def nets(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import nets as module

    return importlib.reload(module)


def _randomized(model, seed=0):
    from helpers import randomize_bn

    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    return randomize_bn(model)


def test_own_module_from_a_factory_file_with_a_ddp_ema_checkpoint(tmp_path, nets):
    model = _randomized(nets.make(), seed=1)
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in model.state_dict().items()},
                "args": {"input_size": (1, 16, 20)}}, tmp_path / "w.pth")
    res = _cli("w.pth", "--model", "nets.py:make", "--data", "digits", "--fp32", "--no-eval", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    man = json.loads((tmp_path / "w.deploykit" / "manifest.json").read_text())
    assert man["source"]["arch"] == "nets.py:make" and man["source"]["weights"] == "state_dict_ema"
    pre = json.loads((tmp_path / "w.deploykit" / "preprocessing.json").read_text())
    assert pre["input_size"] == [1, 16, 20]                      # the file's non-square size, not timm's 224
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 20)).astype(np.float32)
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_logits(tmp_path / "w.deploykit", x), ref, atol=1e-4 * max(1, np.abs(ref).max()))
    # bench rebuilds the PyTorch original through the same factory
    res = subprocess.run([sys.executable, "-m", "deploykit", "bench", "w.deploykit", "--batch", "1", "--runs", "3",
                          "--backends", "torch,onnxruntime", "--eval-images", "50", "--out", "b"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = {v["name"]: v for v in json.loads((tmp_path / "b" / "bench.json").read_text())["variants"]}
    assert rows["torch/fp32"]["accuracy"]["images"] == rows["onnxruntime/fp32"]["accuracy"]["images"] == 50


def test_factory_kwargs_come_from_the_recipe(tmp_path, nets):
    model = _randomized(nets.make(num_classes=10, width=6))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "r.yaml").write_text("name: mine\nmodel: {factory: 'nets.py:make', kwargs: {width: 6}, "
                                     "input_size: 12x12}\nstages: [fuse_bn, export_onnx]\neval: {enabled: false}\n")
    res = _cli("w.pth", "--recipe", "r.yaml", "--data", "digits", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "w.deploykit" / "preprocessing.json").read_text())["input_size"] == [1, 12, 12]


@pytest.mark.parametrize("spec, message", [
    ("missing.py:make", r"model file missing.py not found"),
    ("nets.py:mak", r"nets.py has no 'mak' \(did you mean make\?\)"),
    ("nets.py:broken", r"nets.py:broken\(\) raised RuntimeError: no GPU here"),
    ("nets.py:not_a_model", r"nets.py:not_a_model\(\) returned a int, not a torch.nn.Module"),
    ("nets", r"does not name a factory"),
])
def test_bad_factories_are_one_line_errors_and_write_nothing(tmp_path, nets, spec, message):
    import re

    torch.save(nets.make().state_dict(), tmp_path / "w.pth")
    res = _cli("w.pth", "--model", spec, "--data", "digits", "--fp32", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err) and "Fix: " in err, err
    assert not list(tmp_path.glob("*.deploykit")) and not list(tmp_path.glob(".*tmp*"))


def test_python_api_takes_an_nn_module(tmp_path, nets):
    import deploykit

    model = _randomized(nets.make())
    res = deploykit.compress(None, "fp32", model=model, out=tmp_path / "m.deploykit", data__name="digits",
                             model__input_size="16x16", eval__enabled=False)
    assert res.manifest["source"]["arch"] == "TinyNet"
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_logits(res.path, x), ref, atol=1e-4 * max(1, np.abs(ref).max()))


def _tiny_resnet(num_classes=10, **kwargs):
    """Narrow by default; a plain state dict (which cannot say its widths) uses timm's own widths."""
    kwargs = kwargs or {"channels": (8, 8, 16, 16)}
    return _randomized(timm.create_model("resnet10t", num_classes=num_classes, in_chans=1, **kwargs))


def _swa(path):
    from torch.optim.swa_utils import AveragedModel

    swa = AveragedModel(_tiny_resnet(output_stride=32))
    swa.update_parameters(swa.module)
    torch.save(swa.state_dict(), path)
    return swa.module


def _lightning(path):
    m = _tiny_resnet()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in m.state_dict().items()}, "loss.weight": torch.ones(10)},
                "hyper_parameters": {"arch": "resnet10t", "num_classes": 10,
                                     "model_kwargs": {"channels": [8, 8, 16, 16]}},
                "pytorch-lightning_version": "2.4.0"}, path)
    return m


def _compiled_ddp_safetensors(path):
    from safetensors.torch import save_file

    m = _tiny_resnet(output_stride=32)
    save_file({f"module._orig_mod.{k}": v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return m


@pytest.mark.parametrize("maker, filename, artifact, note", [
    (_swa, "swa.pth", "swa.deploykit", "SWA AveragedModel weights"),
    (_lightning, "epoch=3.ckpt", "epoch=3.deploykit", "using the weights under 'model.'"),
    (_compiled_ddp_safetensors, "w.safetensors", "w.deploykit", "stripped '_orig_mod.' prefix"),
])
def test_checkpoint_forms_through_the_cli(tmp_path, maker, filename, artifact, note):
    model = maker(tmp_path / filename)
    args = [filename, "--fp32", "--no-eval", "--data", "digits", "--input-size", "1x24x24"]
    if "lightning" not in maker.__name__:
        args += ["--arch", "resnet10t", "--weights", "model"] if maker is _swa else ["--arch", "resnet10t"]
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert note in " ".join(res.stderr.split()), res.stderr
    x = np.random.default_rng(0).standard_normal((2, 1, 24, 24)).astype(np.float32)
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_logits(tmp_path / artifact, x), ref, atol=1e-4 * max(1, np.abs(ref).max()))


def test_timm_checkpoint_saver_name_and_weight_choice(tmp_path):
    from deploykit.checkpoint import load_checkpoint

    ema, raw = _tiny_resnet(), _tiny_resnet()
    raw.fc.bias.data += 1.0  # the two weight sets differ visibly
    torch.save({"arch": "resnet10t", "state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(),
                "args": {"model_kwargs": {"channels": [8, 8, 16, 16]}, "input_size": [1, 24, 24]}},
               tmp_path / "model_best.pth.tar")
    x = torch.zeros(1, 1, 24, 24)
    for weights, ref in ((None, ema), ("model", raw)):
        with torch.inference_mode():
            assert torch.equal(load_checkpoint(tmp_path / "model_best.pth.tar", weights=weights).model(x), ref(x))
    res = _cli("model_best.pth.tar", "--weights", "swa", "--fp32", "--no-eval", "--data", "digits", cwd=tmp_path)
    assert res.returncode == 2 and "has no swa weights (it has: ema, model). Fix: pass --weights ema" in res.stderr
    res = _cli("model_best.pth.tar", "--fp32", "--no-eval", "--data", "digits", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "model_best.deploykit" / "manifest.json").is_file()   # .pth.tar dropped from the name


def test_mismatch_names_the_likely_cause(tmp_path):
    torch.save({"arch": "resnet10t", "state_dict": _tiny_resnet().state_dict(),
                "args": {"model_kwargs": {"channels": [8, 8, 16, 16]}}}, tmp_path / "w.pth")
    res = _cli("w.pth", "--num-classes", "7", "--fp32", "--data", "digits", cwd=tmp_path)
    assert res.returncode == 2
    assert "its classifier (fc.weight) has 10 outputs, not 7. Fix: pass --num-classes 10" in " ".join(res.stderr.split())


def test_vit_is_built_for_a_non_square_input_size(tmp_path):
    """A ViT's position embedding depends on the input size: --input-size must reach the model, not only the data."""
    from deploykit.checkpoint import save_timm_checkpoint

    kwargs = {"patch_size": 8, "depth": 1}
    vit = timm.create_model("vit_tiny_patch16_224", img_size=(16, 24), num_classes=10, in_chans=1, **kwargs).eval()
    save_timm_checkpoint(tmp_path / "vit.pth", arch="vit_tiny_patch16_224", state_dict=vit.state_dict(),
                         args={"model": "vit_tiny_patch16_224", "model_kwargs": kwargs})  # no size in the file
    res = _cli("vit.pth", "--input-size", "16x24", "--fp32", "--no-eval", "--data", "digits", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "built for input 16x24 (img_size)" in " ".join(res.stderr.split())
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 24)).astype(np.float32)
    with torch.inference_mode():
        ref = vit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_logits(tmp_path / "vit.deploykit", x), ref, atol=1e-4 * max(1, np.abs(ref).max()))
