"""Knowledge-distillation fine-tuning: the trainer behind the ``distill`` and ``qat`` stages.

The student learns from the teacher's softened logits and the labels:
``loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE_smooth(s, y)`` (Hinton et
al. 2015; T^2 keeps the soft-target gradients on the CE scale). Around it, the practice the field
relies on: AdamW, per-step cosine schedule after a linear warm-up, an EMA of the weights (the EMA
model is evaluated, early-stopped on and returned), bf16 autocast on CPU, gradient-norm clipping,
early stopping on validation macro-F1 (the validation split is carved, stratified, from the *train*
split: the evaluation split is never seen), and for long-tailed data class-balanced sampling or
effective-number loss weights (Cui et al. 2019). Every epoch is checkpointed to a cache directory,
so an interrupted run resumes from its last finished epoch.

Under ``torchrun`` it runs unchanged as PyTorch DDP (gloo on CPU): every process draws the same
global batch order and trains on its slice, gradients are averaged, so N processes with batch B/N
each take the same steps as one process with batch B (BatchNorm statistics stay per process).

Example:
    >>> student, result = fit_distill(student, teacher, train_set, pre, DistillConfig(epochs=3))
    >>> result.best["macro_f1"]
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

from .checkpoint import atomic_torch_save
from .stages.config import StageConfig
from .stop import check_stop


class DistillConfig(StageConfig):
    """Everything the KD trainer does; the ``distill`` stage's config."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (split across DDP processes)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(4.0, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.998, ge=0, lt=1, description="0 disables EMA")
    # bf16 autocast measured ~10x SLOWER than fp32 for EfficientNet-Lite0 training on this AVX-512-BF16 CPU
    # without AMX (depthwise convs have no fast bf16 kernel): available, off by default.
    bf16: bool = Field(False, description="bf16 autocast for forward passes (worth it on CPUs with AMX)")
    clip_grad: float | None = Field(2.0, gt=0, description="max gradient L2 norm; None disables")
    patience: int = Field(3, ge=1, description="epochs without validation macro-F1 gain before stopping")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="stratified slice of the TRAIN split")
    balance: Literal["none", "sampler", "effective_number"] = Field(
        "none", description="class-balanced sampling, or effective-number loss weights (Cui et al. 2019)")
    beta: float = Field(0.999, gt=0, lt=1, description="effective-number beta")
    # Balanced KD (Zhang et al. 2021: instance-balanced label loss, class-balanced distillation loss), by sampling.
    # Why: a pruned student fitted on the data's class mix spends its capacity on the head classes and loses the
    # teacher's minority-class F1 (Lite0, Fashion-MNIST-LT, 0.5x latency: 3.24 top-1 / 3.98 macro-F1 below the
    # original with "data", see docs/decisions.md), while matching the teacher on every class equally keeps the
    # teacher's function, prior included. The label term is reweighted by n_c / (N / K) so it still teaches the
    # data's prior unless ``balance`` asks otherwise. Without a teacher (labels only) it does nothing.
    transfer: Literal["balanced", "data"] = Field(
        "balanced", description="class mix of the batches the student matches the teacher on: balanced = every "
        "class equally (the label loss keeps the data's prior unless balance says otherwise), data = as drawn")
    augment: bool = Field(True, description="random shift (pad + crop) and horizontal flip")
    hflip: bool = True
    max_train_images: int | None = Field(None, ge=1, description="cap on training images (quick runs)")
    seed: int = 0
    teacher: Literal["original", "tta"] = Field("original", description="tta: the original model's logits averaged "
                                                "over tta_views (the service's views)")
    teachers: list[str] = Field(default_factory=list, description="checkpoints of a k-fold or multi-seed ensemble: "
                                "their logits averaged are the teacher (each loaded like any checkpoint)")
    tta_views: list[str] = Field(default_factory=lambda: ["original", "hflip", "scale:0.9", "scale:1.1"])
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while training; None = unchanged")
    progress: bool = True
    resume: bool = Field(True, description="checkpoint every epoch to cache_dir and continue from there")
    cache_dir: str | None = Field(None, description="epoch checkpoints; default ~/.cache/deploykit/distill")


@dataclass
class FitResult:
    best: dict                                  # validation metrics of the returned model
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    stopped_early: bool = False
    val_indices: np.ndarray | None = None       # indices into the train set never trained on
    train_images: int = 0
    world_size: int = 1


# --- losses and weights ------------------------------------------------------------------------------------------


def kd_loss(student_logits, teacher_logits, labels, *, alpha: float, temperature: float,
            label_smoothing: float = 0.0, class_weights=None):
    """alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels, smoothing).

    KL is averaged over the batch (``batchmean``), CE over the batch (weighted mean with class weights).
    """
    import torch.nn.functional as F

    s, t = student_logits.float(), teacher_logits.float()
    T = temperature
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, labels, weight=class_weights, label_smoothing=label_smoothing)
    return alpha * T * T * kl + (1.0 - alpha) * ce


def effective_number_weights(counts, beta: float) -> np.ndarray:
    """Class weights (1 - beta) / (1 - beta^n_c), normalised to average 1 (Cui et al. 2019)."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return (w / w.sum() * len(w)).astype(np.float32)


def data_prior_weights(counts) -> np.ndarray:
    """Per-class weights p_data(c) / p_balanced(c) = n_c * K / N (K = classes present): under class-balanced
    sampling, a label loss weighted by these has the expectation of the unweighted loss on the data's own mix."""
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    return (n * present.sum() / n.sum()).astype(np.float32)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``fraction`` of each class (at least one image of classes with two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        k = max(1, k) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def epoch_order(labels: np.ndarray, epoch: int, seed: int, balanced: bool) -> np.ndarray:
    """Positions into ``labels`` for one epoch; identical on every DDP rank (seeded by seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    n = len(labels)
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=p / p.sum())


# --- EMA ---------------------------------------------------------------------------------------------------------


class ModelEma:
    """Exponential moving average of a model's weights (buffers copied), with the usual warm-up of decay."""

    def __init__(self, model, decay: float):
        import torch

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._torch = torch

    def update(self, model) -> None:
        torch = self._torch
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        with torch.no_grad():
            msd = model.state_dict()
            for k, v in self.module.state_dict().items():
                src = msd[k].detach()
                if v.dtype.is_floating_point:
                    v.mul_(d).add_(src, alpha=1.0 - d)
                else:
                    v.copy_(src)


# --- distributed -------------------------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, world_size); starts the gloo process group when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- data --------------------------------------------------------------------------------------------------------


def augment_batch(x, generator, hflip: bool = True):
    """Random shift by up to 1/8 of the side (reflect-pad + crop) and horizontal flip, per image."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if hflip and flips[i] else crop
    return out


def predict_logits(model, images, pre, batch_size: int = 128) -> np.ndarray:
    """Float32 eval-mode logits over an ImageSet."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for x, _ in images.batches(pre, batch_size):
            outs.append(model(torch.from_numpy(x)).float().numpy())
    return np.concatenate(outs)


# --- the loop ----------------------------------------------------------------------------------------------------


def _cache_key(cfg: DistillConfig, student, teacher, train_set, tag: str) -> str:
    skip = {"progress", "resume", "cache_dir", "epochs", "patience", "threads"}
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip},
                                  sort_keys=True).encode())
    tsd = teacher.state_dict() if teacher is not None else {}
    for name, t in list(student.state_dict().items()) + list(tsd.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.dtype.is_floating_point and t.numel():
            h.update(np.float64(t.double().sum()).tobytes())
    h.update(f"{train_set.name}:{len(train_set)}:{tag}".encode())
    h.update(np.ascontiguousarray(train_set.labels).tobytes())
    return h.hexdigest()[:16]


def fit_distill(student, teacher, train_set, pre, cfg: DistillConfig, *, log: Callable[[str], None] = print,
                tag: str = "", prepare_student: Callable[[Any], Any] | None = None):
    """Fine-tune ``student`` against ``teacher`` on ``train_set``; returns (EMA student in eval mode, FitResult).

    Args:
        train_set: a deploykit.data.ImageSet (the TRAIN split); a stratified ``val_fraction`` of it is held out.
        pre: deploykit.preprocessing.Preprocessing applied to every image.
        tag: extra text in the resume-cache key (e.g. the stage name).
        prepare_student: applied to the student after the optimizer-free setup (QAT inserts fake-quant here).
    """
    import torch

    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(student, teacher, train_set, pre, cfg, log, tag, prepare_student)
    finally:
        torch.set_num_threads(threads_before)


def _fit(student, teacher, train_set, pre, cfg, log, tag, prepare_student):
    import torch

    from .evaluate import classification_metrics

    rank, world = distributed()
    if cfg.batch_size % world:
        from .errors import RecipeError

        raise RecipeError(f"batch_size {cfg.batch_size} does not split over {world} processes",
                          fix=f"use a multiple of {world}")
    torch.manual_seed(cfg.seed)
    if teacher is None:  # plain fine-tuning (e.g. training a reference model): labels only
        cfg = cfg.model_copy(update={"alpha": 0.0})
    else:
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    labels_all = np.asarray(train_set.labels)
    tr_idx, val_idx = stratified_split(labels_all, cfg.val_fraction, cfg.seed)
    if cfg.max_train_images and len(tr_idx) > cfg.max_train_images:
        tr_idx = np.sort(np.random.default_rng(cfg.seed).permutation(tr_idx)[:cfg.max_train_images])
    train_sub, val_set = train_set.subset(tr_idx), train_set.subset(val_idx, name=f"{train_set.name}:val")
    labels = train_sub.labels
    num_classes = len(train_set.class_names)
    counts = np.bincount(labels, minlength=num_classes)
    class_w = (torch.from_numpy(effective_number_weights(counts, cfg.beta))
               if cfg.balance == "effective_number" else None)
    balanced = cfg.balance == "sampler" or (cfg.alpha > 0 and cfg.transfer == "balanced")  # alpha 0: no KD term
    if balanced and cfg.balance != "sampler":  # balanced batches, the label loss still weighted as the data is
        prior = torch.from_numpy(data_prior_weights(counts))
        class_w = prior if class_w is None else class_w * prior

    steps_per_epoch = max(1, len(labels) // cfg.batch_size)  # drop_last: equal batches on every rank
    total = steps_per_epoch * cfg.epochs
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    if prepare_student is not None:
        student = prepare_student(student)
    # a student that is itself a returned EMA model (distill -> qat) arrives with gradients switched off
    student.requires_grad_(True)
    student.train()
    decay, no_decay = [], []
    for n, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = ModelEma(student, cfg.ema_decay) if cfg.ema_decay > 0 else None

    key = _cache_key(cfg, student, teacher, train_set, tag)
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "deploykit" / "distill") / key
    ckpt_path = cache / "last.pth"
    start_epoch, history, best, best_state, bad = 0, [], None, None, 0
    resumed = None
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ck["ema"])
            ema.updates = ck["ema_updates"]
        start_epoch, history, best, best_state, bad = (ck["epoch"], ck["history"], ck["best"], ck["best_state"],
                                                       ck["bad_epochs"])
        resumed = start_epoch
        if rank == 0:
            log(f"distill: resumed from epoch {start_epoch} ({ckpt_path})")

    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student)

    per_rank = cfg.batch_size // world
    progress = None
    if cfg.progress and rank == 0:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
        progress.start()
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            student.train()
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * world + rank)
            order = epoch_order(labels, epoch, cfg.seed, balanced)
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="") \
                if progress else None
            run_loss = 0.0
            for step in range(steps_per_epoch):
                check_stop()
                glob = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                mine = glob[rank * per_rank:(rank + 1) * per_rank]
                x = torch.from_numpy(train_sub.load(pre, mine))
                y = torch.from_numpy(labels[mine])
                if cfg.augment:
                    x = augment_batch(x, gen, cfg.hflip)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    s_logits = model(x)
                    with torch.no_grad():
                        t_logits = teacher(x) if teacher is not None else s_logits.detach()
                loss = kd_loss(s_logits, t_logits, y, alpha=cfg.alpha, temperature=cfg.temperature,
                               label_smoothing=cfg.label_smoothing, class_weights=class_w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(student)
                run_loss = 0.9 * run_loss + 0.1 * loss.item() if step else loss.item()
                if progress:
                    progress.update(task, advance=1, info=f"loss {run_loss:.3f} lr {sched.get_last_lr()[0]:.2e}")
            evaluated = ema.module if ema is not None else student
            m = classification_metrics(predict_logits(evaluated, val_set, pre), val_set.labels, num_classes)
            row = {"epoch": epoch + 1, "loss": round(run_loss, 5), "val_top1": m["top1"], "val_macro_f1": m["macro_f1"]}
            history.append(row)
            improved = best is None or m["macro_f1"] > best["macro_f1"]
            if improved:
                best, bad = {k: m[k] for k in ("top1", "macro_f1", "per_class_recall")} | {"epoch": epoch + 1}, 0
                best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            else:
                bad += 1
            if progress:
                progress.update(task, info=f"loss {run_loss:.3f} val top-1 {m['top1']:.2f} macro-F1 {m['macro_f1']:.2f}"
                                + ("" if improved else f" (no gain {bad}/{cfg.patience})"))
            if rank == 0 and cfg.resume:  # resume: false also means "leave no cache behind"
                ck = {"epoch": epoch + 1, "model": student.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "history": history, "best": best, "best_state": best_state,
                      "bad_epochs": bad, "ema": ema.module.state_dict() if ema else None,
                      "ema_updates": ema.updates if ema else 0}
                atomic_torch_save(ck, ckpt_path)
            if bad >= cfg.patience:
                stopped = True
                break
    finally:
        if progress:
            progress.stop()
    final = ema.module if ema is not None else student
    final.load_state_dict(best_state)
    final.eval()
    return final, FitResult(best=best, best_epoch=best["epoch"], history=history, resumed_from=resumed,
                            stopped_early=stopped, val_indices=val_idx, train_images=int(len(labels)),
                            world_size=world)
