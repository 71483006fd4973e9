"""Accuracy and fidelity metrics on numpy logits: top-1/top-5, macro-F1, per-class F1/recall, agreement.

Example:
    >>> m = classification_metrics(logits, labels, num_classes=10)
    >>> m["top1"], m["macro_f1"]
"""

from __future__ import annotations

import numpy as np


def predict(backend, images, pre, batch_size: int = 64) -> np.ndarray:
    """Logits of ``backend`` over an ImageSet, batch by batch."""
    return np.concatenate([backend.run(x) for x, _ in images.batches(pre, batch_size)])


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def per_class_scores(pred: np.ndarray, labels: np.ndarray, num_classes: int):
    """(precision, recall, f1, support) per class as fractions; 0 where a class has no support/predictions."""
    cm = confusion_matrix(np.asarray(pred, np.int64), np.asarray(labels, np.int64), num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1, support


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    pred = logits.argmax(1)
    _, recall, f1, support = per_class_scores(pred, labels, num_classes)
    k = min(5, num_classes)
    top5 = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    present = support > 0  # macro-F1 over classes present in the evaluation data (as sklearn's labels=)
    return {
        "top1": round(float((pred == labels).mean() * 100), 4),
        "top5": round(float((top5 == labels[:, None]).any(1).mean() * 100), 4),
        "macro_f1": round(float(f1[present].mean() * 100), 4),
        "per_class_f1": [round(float(v * 100), 3) for v in f1],
        "per_class_recall": [round(float(v * 100), 3) for v in recall],
        "support": [int(s) for s in support],
    }


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How closely a compressed model reproduces its source on the same inputs."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum(diff ** 2))
    return {
        "top1_agreement": round(float((reference.argmax(1) == candidate.argmax(1)).mean() * 100), 4),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        # signal-to-quantization-noise ratio in dB, the torchao-style closeness number
        "sqnr_db": round(10 * np.log10(signal / noise), 3) if noise > 0 else float("inf"),
    }
