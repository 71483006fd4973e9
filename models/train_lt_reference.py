"""Train a timm-format reference checkpoint on Fashion-MNIST(-LT) at a chosen input size: the imported ImageNet
EfficientNet-Lite0 fine-tuned on the long-tailed split, or a ResNet-10-T trained from scratch.

Fashion-MNIST-LT: the train split subsampled with exponentially decaying class counts (imbalance
ratio 100, see deploykit/data/fashion_mnist.py); the test split is unchanged and balanced.

Input: the 28x28 grayscale images resized to SIZE x SIZE and replicated to 3 channels, normalised
with the ImageNet-Lite mean/std (0.5): the pretrained RGB stem is kept as it is (no in_chans=1
surgery), so the ImageNet features transfer. SIZE defaults to 32 so that it trains in minutes on 2
shared CPU cores (64 is better but ~2x slower per image here). It uses deploykit's own trainer
(deploykit.training.fit_distill with no teacher = labels only, alpha 0).

``--arch resnet10t``: timm resnet10t at its full width (64-128-256-512), one input channel normalised with the
train split's mean/std, random init (no hub weights here), usually on the balanced ``--data fashion-mnist``.

Usage (the numbers in the model cards came from exactly these):
    python models/import_efficientnet_lite0.py --out models/efficientnet_lite0_in1k.pth
    nice -n 10 python models/train_lt_reference.py --size 32 --epochs 2 --max-train-images 2500 \
        --eval-images 1000 --threads 1 --out models/efficientnet_lite0_fmnist_lt.pth       # 32x32, small budget
    python models/train_lt_reference.py --size 64 --epochs 3 --threads 2 \
        --out models/efficientnet_lite0_fmnist_lt64.pth                                   # 64x64, whole LT split
    python models/train_lt_reference.py --arch resnet10t --data fashion-mnist --size 64 --epochs 4 \
        --batch-size 128 --lr 3e-3 --threads 2 --out models/resnet10t_fmnist64.pth        # ResNet, 64x64, balanced
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tf_efficientnet_lite0", choices=["tf_efficientnet_lite0", "resnet10t"])
    ap.add_argument("--data", default="fashion-mnist-lt", choices=["fashion-mnist-lt", "fashion-mnist"])
    ap.add_argument("--imagenet", default="models/efficientnet_lite0_in1k.pth", help="Lite0's ImageNet init")
    ap.add_argument("--out", default="models/efficientnet_lite0_fmnist_lt.pth")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-train-images", type=int, default=None)
    ap.add_argument("--balance", default="none", choices=["none", "sampler", "effective_number"])
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from deploykit.checkpoint import load_checkpoint, save_timm_checkpoint
    from deploykit.data.fashion_mnist import CLASS_NAMES, MEAN, STD, load_fashion_mnist
    from deploykit.evaluate import classification_metrics
    from deploykit.preprocessing import Preprocessing
    from deploykit.training import DistillConfig, fit_distill, predict_logits

    t0 = time.time()
    if args.arch == "resnet10t":  # from scratch, one channel: nothing pretrained to keep an RGB stem for
        import timm
        import torch

        torch.manual_seed(0)
        model, init, chans, mean, std = (timm.create_model("resnet10t", num_classes=10, in_chans=1), "random",
                                         1, (MEAN,), (STD,))
    else:  # the pretrained RGB stem is kept as it is (no in_chans=1 surgery), so the ImageNet features transfer
        model, init, chans, mean, std = (load_checkpoint(args.imagenet).model, "ImageNet-1k (efficientnet-lite0-"
                                         "pytorch-model 0.1.0)", 3, (0.5,) * 3, (0.5,) * 3)
        model.reset_classifier(10)
    pre = Preprocessing(input_size=(chans, args.size, args.size), mean=mean, std=std,
                        interpolation="bilinear", class_names=CLASS_NAMES)
    train = load_fashion_mnist("train", long_tailed=args.data == "fashion-mnist-lt")
    test = load_fashion_mnist("test").head(args.eval_images, seed=0)
    cfg = DistillConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, balance=args.balance,
                        max_train_images=args.max_train_images, threads=args.threads, warmup_epochs=0.3,
                        patience=args.epochs, resume=True)
    model, res = fit_distill(model, None, train, pre, cfg, tag="lt-reference")
    m = classification_metrics(predict_logits(model, test, pre), test.labels, 10)
    card = {"arch": args.arch, "init": init,
            "data": "fashion-mnist-lt (imbalance 100)" if args.data == "fashion-mnist-lt" else args.data,
            "train_images": res.train_images, "train_class_counts": np.bincount(train.labels, minlength=10).tolist(),
            "input_size": list(pre.input_size),
            "epochs_run": len(res.history), "balance": args.balance, "history": res.history,
            "test_images": len(test), "test_top1": m["top1"], "test_macro_f1": m["macro_f1"],
            "test_per_class_recall": m["per_class_recall"], "train_seconds": round(time.time() - t0, 1),
            "command": "python models/train_lt_reference.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    save_timm_checkpoint(args.out, arch=args.arch, state_dict=model.state_dict(),
                         args={"num_classes": 10, "in_chans": chans, "input_size": tuple(pre.input_size),
                               "mean": mean, "std": std, "interpolation": "bilinear", "crop_pct": 1.0},
                         class_names=CLASS_NAMES, extra={"model_card": card})
    Path(args.out).with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps({k: card[k] for k in ("test_top1", "test_macro_f1", "train_images", "train_seconds")}))


if __name__ == "__main__":
    main()
