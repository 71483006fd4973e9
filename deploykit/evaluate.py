"""Accuracy and fidelity metrics on numpy logits: top-1/top-5, macro-F1, per-class scores (scikit-learn), agreement.

Example:
    >>> m = classification_metrics(logits, labels, num_classes=10)
    >>> m["top1"], m["macro_f1"]
"""

from __future__ import annotations

import numpy as np


def predict(backend, images, pre, batch_size: int = 64) -> np.ndarray:
    """Logits of ``backend`` over an ImageSet, batch by batch."""
    return np.concatenate([backend.run(x) for x, _ in images.batches(pre, batch_size)])


def _check(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if len(pred) != len(labels) or not len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels")
    for name, v in (("label", labels), ("prediction", pred)):
        if v.min() < 0 or v.max() >= num_classes:
            raise ValueError(f"{name}s must lie in 0..{num_classes - 1}; got {int(v.min())}..{int(v.max())}")


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class, over all ``num_classes`` classes (scikit-learn)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    pred, labels = np.asarray(pred, np.int64), np.asarray(labels, np.int64)
    _check(pred, labels, num_classes)
    return sk_confusion_matrix(labels, pred, labels=np.arange(num_classes))


def per_class_scores(pred: np.ndarray, labels: np.ndarray, num_classes: int):
    """(precision, recall, f1, support) per class of ``range(num_classes)`` as fractions (scikit-learn).

    Undefined ratios are 0: precision of a class never predicted, recall of a class absent from ``labels``. F1
    is 2TP / (2TP + FP + FN), so a class predicted but absent from the labels has F1 0, not an omission.
    """
    from sklearn.metrics import precision_recall_fscore_support

    pred, labels = np.asarray(pred, np.int64), np.asarray(labels, np.int64)
    _check(pred, labels, num_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(num_classes), average=None, zero_division=0)
    return precision, recall, f1, support


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1/top-5 accuracy, macro-F1 and per-class precision/recall/F1 in percent, support in images.

    Computed with scikit-learn over every class in ``range(num_classes)`` (``labels=range(num_classes)``,
    ``zero_division=0``): a class the model predicts but the labels lack counts in macro-F1 with F1 0, as does a
    class absent from both. Top-1 is the accuracy of ``logits.argmax(1)``, the predictions the per-class numbers
    use (argmax takes the first of tied logits; ``top_k_accuracy_score`` the last); top-5 is
    ``top_k_accuracy_score`` (100 when there are at most 5 classes).
    """
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits of shape {logits.shape} for {num_classes} classes")
    pred = logits.argmax(1)
    precision, recall, f1, support = per_class_scores(pred, labels, num_classes)
    classes = np.arange(num_classes)
    k = min(5, num_classes)
    top5 = 1.0 if k == num_classes else top_k_accuracy_score(labels, logits, k=k, labels=classes)
    macro_f1 = f1.mean()  # scikit-learn's macro average over labels=classes: the mean of these per-class F1s
    return {
        "top1": round(float(accuracy_score(labels, pred)) * 100, 4),
        "top5": round(float(top5) * 100, 4),
        "macro_f1": round(float(macro_f1) * 100, 4),
        "per_class_f1": [round(float(v * 100), 3) for v in f1],
        "per_class_recall": [round(float(v * 100), 3) for v in recall],
        "per_class_precision": [round(float(v * 100), 3) for v in precision],
        "support": [int(s) for s in support],
    }


def fidelity(reference: np.ndarray, candidate: np.ndarray, tol: float | None = None) -> dict:
    """How closely a compressed model reproduces its source on the same inputs.

    With ``tol`` (the logit error the check allows), ``decided_agreement`` is top-1 agreement on the inputs the
    reference decides by more than that: its top-two logit gap exceeds ``2 * tol``, so an error within the
    tolerance cannot flip them. Plain agreement also counts near-ties (a random or synthetic-input network's
    top-two logits can be closer than FP32 kernel rounding, which differs between AVX2, AVX-512 and AMX CPUs),
    so it is reported, but gates use the decided one.
    """
    ref, got = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(ref - got)
    signal = float(np.sum(ref ** 2))
    noise = float(np.sum(diff ** 2))
    agree = reference.argmax(1) == candidate.argmax(1)
    out = {
        "top1_agreement": round(float(agree.mean() * 100), 4),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        # signal-to-quantization-noise ratio in dB, the torchao-style closeness number
        "sqnr_db": round(10 * np.log10(signal / noise), 3) if noise > 0 else float("inf"),
    }
    if tol is not None:
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * tol
        out.update({"tolerance": float(tol), "decided_inputs": int(decided.sum()),
                    "decided_agreement": round(float(agree[decided].mean() * 100), 4) if decided.any() else 100.0})
    return out


def int8_fidelity_problem(fid: dict, min_top1_agreement: float, min_sqnr_db: float) -> str | None:
    """The one rule every INT8 stage applies to its model against FP32 (None: it passes).

    A model fails only when agreement *and* SQNR are both low: agreement alone is a poor alarm on near-tied
    logits (random weights, synthetic inputs), where SQNR is not fooled; SQNR alone misses a model whose error
    concentrates on the deciding logits.

    Example:
        >>> int8_fidelity_problem({"top1_agreement": 75.0, "sqnr_db": 14.9}, 90.0, 20.0)
        'agrees with FP32 on only 75.0% of inputs (limit 90.0%) at SQNR 14.9 dB (limit 20.0)'
    """
    if fid["top1_agreement"] < min_top1_agreement and fid["sqnr_db"] < min_sqnr_db:
        return (f"agrees with FP32 on only {fid['top1_agreement']:.1f}% of inputs (limit {min_top1_agreement}%) "
                f"at SQNR {fid['sqnr_db']:.1f} dB (limit {min_sqnr_db})")
    return None
