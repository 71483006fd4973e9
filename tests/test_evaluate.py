"""classification_metrics: hand-computed values, and the same numbers as scikit-learn's metrics."""

import numpy as np
import pytest
from sklearn.metrics import (confusion_matrix as sk_confusion_matrix, f1_score, precision_recall_fscore_support,
                             top_k_accuracy_score)

from deploykit.evaluate import classification_metrics, confusion_matrix

# 8 images of classes 0-2; the model also predicts class 3, which no image has.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PRED = np.array([0, 0, 3, 1, 0, 2, 2, 3])


def _logits(pred, num_classes):
    """Logits whose argmax is ``pred`` (no ties)."""
    x = np.linspace(0.0, 0.5, num_classes)[None].repeat(len(pred), 0)
    x[np.arange(len(pred)), pred] = 2.0
    return x.astype(np.float32)


def test_a_predicted_but_absent_class_counts_in_macro_f1():
    m = classification_metrics(_logits(PRED, 4), LABELS, 4)
    # By hand: class 0: TP 2, FP 1 (image 4), FN 1 (image 2) -> P = R = F1 = 2/3
    #          class 1: TP 1, FP 0, FN 1 (image 4)           -> P 1, R 1/2, F1 2/3
    #          class 2: TP 2, FP 0, FN 1 (image 7)           -> P 1, R 2/3, F1 4/5
    #          class 3: TP 0, FP 2 (images 2, 7), no support -> P 0, R 0, F1 = 2TP / (2TP + FP + FN) = 0
    assert m["top1"] == 62.5                                            # 5 of 8 right
    assert m["per_class_f1"] == [66.667, 66.667, 80.0, 0.0]
    assert m["per_class_precision"] == [66.667, 100.0, 100.0, 0.0]
    assert m["per_class_recall"] == [66.667, 50.0, 66.667, 0.0]
    assert m["support"] == [3, 2, 3, 0]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 4 / 5 + 0) / 4 * 100, abs=1e-4)    # 53.3333
    # the old computation averaged over the classes present in the labels only: (2/3 + 2/3 + 4/5) / 3 = 71.11
    assert m["macro_f1"] != pytest.approx(71.1111, abs=1e-3)
    # scikit-learn agrees: its default labels (the union of true and predicted classes) are classes 0-3 here
    assert m["macro_f1"] == pytest.approx(f1_score(LABELS, PRED, average="macro") * 100, abs=1e-4)
    p, r, f, s = precision_recall_fscore_support(LABELS, PRED, labels=range(4), zero_division=0)
    np.testing.assert_allclose(m["per_class_precision"], p * 100, atol=1e-3)
    np.testing.assert_allclose(m["per_class_recall"], r * 100, atol=1e-3)
    np.testing.assert_allclose(m["per_class_f1"], f * 100, atol=1e-3)
    assert m["support"] == s.tolist()


def test_every_class_of_the_model_counts_even_when_absent_from_labels_and_predictions():
    # class 4 exists in the model but in neither the labels nor the predictions: F1 0 (zero_division=0)
    m = classification_metrics(_logits(PRED, 5), LABELS, 5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 4 / 5) / 5 * 100, abs=1e-4)          # 42.6667
    assert m["macro_f1"] == pytest.approx(
        f1_score(LABELS, PRED, labels=range(5), average="macro", zero_division=0) * 100, abs=1e-4)
    assert m["per_class_f1"][4] == 0.0 and m["support"][4] == 0
    assert m["top5"] == 100.0                                                  # 5 classes: top-5 is everything


def test_top5_counts_the_rank_of_the_true_class():
    # 6 classes; the true class is ranked 1st, 5th, 6th and 3rd by the logits -> top-1 1/4, top-5 3/4
    logits = np.array([[9, 1, 2, 3, 4, 5],
                       [9, 8, 7, 6, 5, 1],
                       [1, 9, 8, 7, 6, 5],
                       [9, 8, 7, 1, 2, 3]], dtype=np.float32)
    labels = np.array([0, 4, 0, 2])
    m = classification_metrics(logits, labels, 6)
    assert (m["top1"], m["top5"]) == (25.0, 75.0)
    assert m["top5"] == top_k_accuracy_score(labels, logits, k=5, labels=range(6)) * 100
    assert m["top1"] == top_k_accuracy_score(labels, logits, k=1, labels=range(6)) * 100


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, LABELS, 4)
    assert cm.tolist() == [[2, 0, 0, 1],      # rows: true class, columns: predicted class
                           [1, 1, 0, 0],
                           [0, 0, 2, 1],
                           [0, 0, 0, 0]]
    assert np.array_equal(cm, sk_confusion_matrix(LABELS, PRED, labels=range(4)))


def test_matches_sklearn_on_a_larger_random_case():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, 500)                      # class 9 never occurs in the labels
    logits = rng.standard_normal((500, 10)).astype(np.float32)
    logits[np.arange(500), labels] += 1.0                 # better than chance, not perfect
    pred = logits.argmax(1)
    m = classification_metrics(logits, labels, 10)
    assert (pred == 9).sum() > 10 and m["per_class_f1"][9] == 0.0 and m["per_class_precision"][9] == 0.0
    assert m["top1"] == pytest.approx((pred == labels).mean() * 100, abs=1e-4)
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(10)) * 100, abs=1e-4)
    assert m["macro_f1"] == pytest.approx(
        f1_score(labels, pred, labels=range(10), average="macro", zero_division=0) * 100, abs=1e-4)
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=range(10), zero_division=0)
    np.testing.assert_allclose(m["per_class_f1"], f * 100, atol=1e-3)
    np.testing.assert_allclose(m["per_class_recall"], r * 100, atol=1e-3)
    np.testing.assert_allclose(m["per_class_precision"], p * 100, atol=1e-3)
    assert m["support"] == s.tolist() and m["support"][9] == 0


def test_inputs_that_do_not_fit_the_class_count_are_refused():
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        classification_metrics(_logits(PRED, 4), np.array([0, 0, 0, 1, 1, 2, 2, 4]), 4)
    with pytest.raises(ValueError, match=r"logits of shape \(8, 4\) for 5 classes"):
        classification_metrics(_logits(PRED, 4), LABELS, 5)


def test_fidelity_counts_agreement_only_where_the_tolerance_cannot_flip_the_argmax():
    from deploykit.evaluate import fidelity

    ref = np.array([[3.0, 1.0, 0.0], [1.0, 1.01, 0.0], [0.0, 2.0, 5.0]])
    got = np.array([[2.9, 1.1, 0.0], [1.02, 1.0, 0.0], [0.0, 2.0, 5.0]])   # a near-tie flips within tolerance
    fid = fidelity(ref, got, tol=0.1)
    assert fid["top1_agreement"] == pytest.approx(200 / 3, abs=1e-3)
    # gaps 2.0, 0.01, 3.0 against 2 * 0.1: the near-tie is left out, the other two are decided and agree
    assert (fid["decided_inputs"], fid["decided_agreement"]) == (2, 100.0)
    got[2] = [0.0, 6.0, 5.0]                                               # an error beyond tolerance flips input 2
    fid = fidelity(ref, got, tol=0.1)
    assert (fid["decided_inputs"], fid["decided_agreement"]) == (2, 50.0)
    assert "decided_agreement" not in fidelity(ref, got)                   # no tolerance, no gate number


def test_the_data_free_int8_rule_matches_real_photos_on_the_measured_cases():
    """bench/results/datafree_lite0.json: EfficientNet-Lite0 (ImageNet weights) quantized without data. The stages'
    data-free rule on the synthetic check set must give the verdict 20 real photos gave (pass: >= 19/20 agree)."""
    import json
    from pathlib import Path

    from deploykit.stages.quantize_onnx import QuantizeOnnx
    from deploykit.stages.quantize_openvino import QuantizeOpenVino

    runs = json.loads((Path(__file__).parent.parent / "bench/results/datafree_lite0.json").read_text())["runs"]
    for cfg in (QuantizeOnnx.Config(), QuantizeOpenVino.Config()):
        for run in runs:
            for m in run["models"]:
                verdict = cfg.fidelity_problem(m["synthetic"], data_free=True) is None
                assert verdict == (m["real"]["agree_of_20"] >= 19), (m["model"], m["synthetic"], m["real"])
