"""Train deploykit's built-in reference checkpoints on Fashion-MNIST (28x28 grayscale): timm resnet10t, or a small
ViT (``--arch vit``: timm vit_tiny_patch16_224 at 28x28, patch 4, 4 blocks of width 96).

The result is saved in timm ``train.py`` checkpoint format (what ``timm.utils.CheckpointSaver`` writes):
``epoch``, ``arch``, ``state_dict``, ``state_dict_ema``, ``version``, ``metric`` and ``args`` (an
``argparse.Namespace`` with timm train.py field names), plus ``class_names``.

Reproduce (CPU, 2 threads, ~10 minutes each):
    .venv/bin/python models/train_reference.py
    .venv/bin/python models/train_reference.py --arch vit --out models/vit_fmnist.pth
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Sleep (rather than spin) in idle OpenMP workers: on a shared, oversubscribed CPU the default spin-wait
# made 2-thread training ~8x slower. Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import timm  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploykit.data.fashion_mnist import MEAN, STD, load_fashion_mnist  # noqa: E402

# name -> (timm arch, model kwargs). The ViT is the smallest timm ViT that learns Fashion-MNIST at 28x28: 7x7
# patches of 4 pixels, 4 blocks of 96 wide with 3 heads (~0.45M parameters).
REFERENCES = {
    "resnet10t": ("resnet10t", {"channels": (16, 32, 64, 128)}),
    "vit": ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}),
}
ARCH, MODEL_KWARGS = REFERENCES["resnet10t"]
NUM_CLASSES = 10
IMG_SIZE = 28
PAD = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(REFERENCES), default="resnet10t")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="models/resnet10t_fmnist.pth")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.3)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--model-ema-decay", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate on the test set every N epochs (0: only after the last epoch)")
    return p.parse_args(argv)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_model() -> torch.nn.Module:
    return timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES, in_chans=1, **MODEL_KWARGS)


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), x = (img/255 - MEAN) / STD."""
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random 28x28 crop from the image zero-padded by 2 px (uint8 in, uint8 out)."""
    n = images_u8.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None], images_u8.flip(-1), images_u8)
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # zero = black background
    oy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    ar = torch.arange(IMG_SIZE)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


@torch.no_grad()
def predict(model: torch.nn.Module, images_u8: torch.Tensor, batch: int = 500) -> np.ndarray:
    model.eval()
    preds = [model(normalize(images_u8[i:i + batch])).argmax(1) for i in range(0, len(images_u8), batch)]
    return torch.cat(preds).numpy()


def top1_and_macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> tuple[float, float]:
    top1 = float((pred == labels).mean())
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return top1, float(np.mean(f1s))


def lr_lambda_factory(total_steps: int, warmup_steps: int):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return fn


def timm_args(a: argparse.Namespace) -> argparse.Namespace:
    """The args namespace stored in the checkpoint, with timm train.py field names."""
    return argparse.Namespace(
        model=ARCH, num_classes=NUM_CLASSES, in_chans=1, input_size=(1, IMG_SIZE, IMG_SIZE), img_size=IMG_SIZE,
        mean=(MEAN,), std=(STD,), interpolation="bilinear", crop_pct=1.0, model_kwargs=dict(MODEL_KWARGS),
        epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, opt="adamw", sched="cosine",
        warmup_epochs=a.warmup_epochs, smoothing=a.smoothing, model_ema=True, model_ema_decay=a.model_ema_decay,
        hflip=0.5, seed=a.seed, batch_size=a.batch_size,
        dataset="fashion-mnist",  # a deploykit built-in: `deploykit compress` evaluates on it without --data
    )


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify(path: Path, test_images: torch.Tensor, test_labels: np.ndarray) -> tuple[float, float]:
    """Reload with weights_only=True, rebuild from the stored args and check the recorded EMA accuracy."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    a = ckpt["args"]
    model = timm.create_model(ckpt["arch"], pretrained=False, num_classes=a.num_classes, in_chans=a.in_chans,
                              **a.model_kwargs)
    model.load_state_dict(ckpt["state_dict_ema"], strict=True)
    top1, f1 = top1_and_macro_f1(predict(model, test_images), test_labels)
    if abs(100.0 * top1 - ckpt["metric"]) > 1e-6:
        raise SystemExit(f"verification failed: reloaded top-1 {100 * top1:.4f} != recorded {ckpt['metric']:.4f}")
    return top1, f1


def main(argv=None) -> None:
    global ARCH, MODEL_KWARGS
    a = parse_args(argv)
    ARCH, MODEL_KWARGS = REFERENCES[a.arch]
    torch.set_num_threads(a.threads)
    seed_all(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    train_x, train_y = torch.from_numpy(train.images.copy()), torch.from_numpy(train.labels.astype(np.int64))
    test_x, test_y = torch.from_numpy(test.images.copy()), test.labels.astype(np.int64)

    model = create_model()
    n_params = sum(p.numel() for p in model.parameters())
    # exclude_buffers=False (default): BN running stats are averaged alongside the weights.
    ema = ModelEmaV3(model, decay=a.model_ema_decay, exclude_buffers=False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    steps_per_epoch = math.ceil(len(train_x) / a.batch_size)
    total = steps_per_epoch * a.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda_factory(total, int(round(a.warmup_epochs * steps_per_epoch))))
    print(f"{ARCH} {MODEL_KWARGS} params={n_params:,} train={len(train_x)} test={len(test_x)} "
          f"epochs={a.epochs} steps/epoch={steps_per_epoch} threads={a.threads}", flush=True)

    step = 0
    train_secs = 0.0  # time spent in the training loops (excludes test-set evaluation)
    t_start = time.time()
    for epoch in range(a.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(train_x), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch_size:(i + 1) * a.batch_size]
            x = normalize(augment(train_x[idx], gen))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=a.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            ema.update(model, step=step)
            loss_sum += loss.item()
            if (i + 1) % 100 == 0:
                print(f"  epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        train_secs += time.time() - t0
        msg = (f"epoch {epoch + 1}/{a.epochs} loss {loss_sum / steps_per_epoch:.4f} "
               f"epoch {time.time() - t0:.1f}s")
        last = epoch + 1 == a.epochs
        if last or (a.eval_every and (epoch + 1) % a.eval_every == 0):
            raw = top1_and_macro_f1(predict(model, test_x), test_y)
            ema_m = top1_and_macro_f1(predict(ema.module, test_x), test_y)
            msg += (f" | raw top1 {100 * raw[0]:.2f} f1 {100 * raw[1]:.2f}"
                    f" | ema top1 {100 * ema_m[0]:.2f} f1 {100 * ema_m[1]:.2f}")
        print(f"{msg} | total {time.time() - t_start:.1f}s", flush=True)
    wall = time.time() - t_start

    ckpt = {
        "epoch": a.epochs - 1,  # timm CheckpointSaver records the 0-based index of the last epoch
        "arch": ARCH,
        "state_dict": model.state_dict(),
        "state_dict_ema": ema.module.state_dict(),
        "version": 2,
        "metric": 100.0 * ema_m[0],
        "args": timm_args(a),
        "class_names": list(train.class_names),
    }
    out = Path(a.out)
    save_atomic(ckpt, out)
    size = out.stat().st_size
    if size >= 20 * 1024 * 1024:
        raise SystemExit(f"checkpoint too large: {size} bytes")
    v_top1, v_f1 = verify(out, test_x, test_y)
    print(f"saved {out} ({size:,} bytes) in timm train.py format; training {train_secs:.1f}s "
          f"(wall incl. evaluation {wall:.1f}s)")
    print(f"FINAL ema top1 {100 * ema_m[0]:.2f} macro-F1 {100 * ema_m[1]:.2f} | "
          f"raw top1 {100 * raw[0]:.2f} macro-F1 {100 * raw[1]:.2f} | verified reload top1 {100 * v_top1:.2f}")


if __name__ == "__main__":
    main()
