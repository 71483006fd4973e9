"""Forgetting report: counts and flags match a confusion case worked out by hand."""

import numpy as np
import pytest

from deploykit.forgetting import forgetting_markdown, forgetting_report


def test_counts_match_a_hand_made_case():
    # 3 classes, 10 images each. Original: 9/10 right in every class (27/30 = 90%).
    # Compressed: class 0 unchanged; class 1 loses 1 (8/10); class 2 loses 4 and gains back 1 (6/10).
    labels = np.repeat([0, 1, 2], 10)
    orig = labels.copy()
    orig[[9, 19, 29]] = [1, 2, 0]                          # one miss per class
    comp = orig.copy()
    comp[10] = 0                                           # class 1: a right -> wrong (CIE)
    comp[[20, 21, 22, 23]] = 1                             # class 2: four CIEs
    comp[29] = 2                                           # class 2: the original's miss is now right (gained)
    rep = forgetting_report(labels, orig, comp, ["a", "b", "c"])
    o = rep["overall"]
    # 27 right - 5 CIEs + 1 gained = 23 right
    assert o["top1_original"] == 90.0 and o["top1_compressed"] == pytest.approx(23 / 30 * 100, abs=1e-3)
    assert o["top1_drop"] == pytest.approx(4 / 30 * 100, abs=1e-3)
    assert o["cie"] == 5 and o["gained"] == 1 and o["cie_percent"] == pytest.approx(5 / 30 * 100, abs=1e-3)
    by = {r["class"]: r for r in rep["classes"]}
    assert by["a"]["recall_change"] == 0 and by["a"]["cie"] == 0
    assert by["b"]["recall_change"] == pytest.approx(-10.0) and by["b"]["cie"] == 1
    assert by["c"]["recall_change"] == pytest.approx(-30.0) and by["c"]["cie"] == 4 and by["c"]["gained"] == 1
    # flag rule: recall drop > 2 x 13.33 points -> only class c (30 > 26.67); b's 10 is not
    assert rep["flagged"] == ["c"]
    assert [r["class"] for r in rep["classes"]] == ["c", "b", "a"]      # sorted by damage
    # F1 by hand for class c: 7 predicted c (6 right + image 19 of class b) -> precision 6/7, recall 6/10
    p, r = 6 / 7, 0.6
    assert by["c"]["f1_compressed"] == pytest.approx(2 * p * r / (p + r) * 100, abs=1e-3)
    md = forgetting_markdown(rep)
    assert md.index("| c |") < md.index("| b |") < md.index("| a |")
    assert "**5**" in md and "**!**" in md


def test_logits_and_no_drop_flags_nothing():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 4))
    labels = logits.argmax(1)
    rep = forgetting_report(labels, logits, logits.copy())
    assert rep["overall"]["cie"] == 0 and rep["flagged"] == [] and rep["overall"]["top1_drop"] == 0
