"""What compression forgets: per-class damage and compression-identified exemplars (Hooker et al. 2019).

Top-1 can barely move while a minority class loses a third of its recall. Per class we compare the
original and compressed models' recall and F1 on the same labelled images, flag classes whose recall
drop exceeds twice the overall top-1 drop, and count *compression-identified exemplars* (CIEs): images
the original classifies right and the compressed model wrong (Hooker et al. 2019, "What do compressed
deep neural networks forget?" use the disagreement of model populations; with one model each, the
right-to-wrong flips are the direct analogue). Flips the other way are counted too.

Example:
    >>> rep = forgetting_report(labels, logits_fp32, logits_int8, class_names)
    >>> print(forgetting_markdown(rep))
"""

from __future__ import annotations

import numpy as np


def _per_class(pred: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .evaluate import per_class_scores

    _, recall, f1, support = per_class_scores(pred, labels, k)
    return recall * 100, f1 * 100, support


def forgetting_report(labels, original, compressed, class_names: list[str] | None = None,
                      flag_factor: float = 2.0) -> dict:
    """Per-class recall/F1 change and CIE counts; ``original``/``compressed`` are logits or predicted classes.

    Returns a dict with ``overall`` (top-1 of both, drop, CIE totals) and ``classes``: one row per class,
    sorted by damage (largest recall drop first, then F1 drop).
    """
    labels = np.asarray(labels, dtype=np.int64)
    po = np.asarray(original)
    pc = np.asarray(compressed)
    po = po.argmax(1) if po.ndim == 2 else po.astype(np.int64)
    pc = pc.argmax(1) if pc.ndim == 2 else pc.astype(np.int64)
    k = len(class_names) if class_names else int(max(labels.max(), po.max(), pc.max()) + 1)
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    ro, fo, support = _per_class(po, labels, k)
    rc, fc, _ = _per_class(pc, labels, k)
    right_o, right_c = po == labels, pc == labels
    cie = right_o & ~right_c
    gained = ~right_o & right_c
    top1_o, top1_c = float(right_o.mean() * 100), float(right_c.mean() * 100)
    drop = top1_o - top1_c
    threshold = flag_factor * max(drop, 0.0)
    rows = []
    for i in range(k):
        recall_drop = float(ro[i] - rc[i])
        rows.append({
            "class": names[i], "index": i, "support": int(support[i]),
            "recall_original": round(float(ro[i]), 3), "recall_compressed": round(float(rc[i]), 3),
            "recall_change": round(-recall_drop, 3),
            "f1_original": round(float(fo[i]), 3), "f1_compressed": round(float(fc[i]), 3),
            "f1_change": round(float(fc[i] - fo[i]), 3),
            "cie": int((cie & (labels == i)).sum()), "gained": int((gained & (labels == i)).sum()),
            # a class is flagged when it lost recall and lost more than twice what the model lost overall
            "flagged": bool(support[i] > 0 and recall_drop > 0 and recall_drop > threshold),
        })
    rows.sort(key=lambda r: (r["recall_change"], r["f1_change"], r["index"]))
    return {
        "overall": {"images": int(len(labels)), "top1_original": round(top1_o, 3), "top1_compressed": round(top1_c, 3),
                    "top1_drop": round(drop, 3), "flag_threshold_recall_drop": round(threshold, 3),
                    "cie": int(cie.sum()), "gained": int(gained.sum()),
                    "cie_percent": round(float(cie.mean() * 100), 3),
                    "macro_f1_original": round(float(fo.mean()), 3),  # over all classes, as sklearn and the report
                    "macro_f1_compressed": round(float(fc.mean()), 3)},
        "classes": rows,
        "flagged": [r["class"] for r in rows if r["flagged"]],
    }


def forgetting_markdown(report: dict) -> str:
    """The report.md section: a per-class table sorted by damage, flagged classes marked."""
    o = report["overall"]
    lines = ["### What compression forgets (per class, sorted by damage)", "",
             f"Top-1 {o['top1_original']:.2f}% -> {o['top1_compressed']:.2f}% (drop {o['top1_drop']:.2f}), macro-F1 "
             f"{o['macro_f1_original']:.2f} -> {o['macro_f1_compressed']:.2f}. Compression-identified exemplars "
             f"(right before, wrong after): **{o['cie']}** of {o['images']} images ({o['cie_percent']:.2f}%); "
             f"{o['gained']} went the other way. Flagged: " + (
                 f"classes whose recall fell by more than {o['flag_threshold_recall_drop']:.2f} points (2x the "
                 "overall drop)." if o['top1_drop'] > 0 else
                 "every class whose recall fell (overall top-1 did not drop, so any loss is a class paying for "
                 "the others)."), "",
             "| class | support | recall orig | recall comp | change | F1 orig | F1 comp | change | CIEs | flag |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in report["classes"]:
        lines.append(f"| {r['class']} | {r['support']} | {r['recall_original']:.1f} | {r['recall_compressed']:.1f} | "
                     f"{r['recall_change']:+.1f} | {r['f1_original']:.1f} | {r['f1_compressed']:.1f} | "
                     f"{r['f1_change']:+.1f} | {r['cie']} | {'**!**' if r['flagged'] else ''} |")
    return "\n".join(lines) + "\n"
