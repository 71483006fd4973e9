"""The TTA policy chooser on recorded logits, and the two-call selective path."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.tta_policy import TTAPolicy, apply_policy, choose_policy, gate_scores


def onehot_logits(pred: np.ndarray, k: int, confidence: np.ndarray) -> np.ndarray:
    """Logits predicting ``pred`` with a top-1 lead of ``confidence`` over the rest."""
    out = np.zeros((len(pred), k), np.float32)
    out[np.arange(len(pred)), pred] = confidence
    return out


def recorded(n=100, k=5):
    """100 images, 80 right from the original view. The 20 wrong ones are the least confident; hflip fixes 10 of
    them (and breaks none), the zooms fix nothing and break 2 confident ones each."""
    labels = np.arange(n) % k
    wrong = np.arange(20)
    base_pred = labels.copy()
    base_pred[wrong] = (labels[wrong] + 1) % k
    conf = np.where(np.isin(np.arange(n), wrong), 0.5, 4.0).astype(np.float32)
    conf[wrong] += np.linspace(0, 0.1, 20)  # distinct scores among the uncertain ones
    original = onehot_logits(base_pred, k, conf)
    flip_pred = base_pred.copy()
    flip_pred[:10] = labels[:10]              # fixes 10 wrong images: with weight 2 it outvotes the original
    hflip = onehot_logits(flip_pred, k, np.where(np.arange(n) < 10, 2.0, 1.0).astype(np.float32))
    zoom_pred = labels.copy()
    zoom_pred[wrong] = base_pred[wrong]
    zoom_pred[50:52] = (labels[50:52] + 2) % k  # breaks 2 confident images... if they outvote the original
    zoom = onehot_logits(zoom_pred, k, np.where(np.isin(np.arange(n), [50, 51]), 9.0, 1.0).astype(np.float32))
    return {"original": original, "hflip": hflip, "scale:0.9": zoom, "scale:1.1": zoom.copy()}, labels


def test_no_gain_means_no_tta():
    logits, labels = recorded()
    same = {v: logits["original"] for v in logits}
    p = choose_policy(same, labels)
    assert p.mode == "none" and p.views == ("original",) and p.mean_views == 1.0
    assert p.reason.startswith("TTA does not help this model: the best view subset changes top-1 by +0.00 points")
    assert all(s["fixed"] == s["broken"] == 0 for s in p.subsets) and len(p.subsets) == 7  # 2^3 - 1 subsets


def test_cheapest_policy_keeping_90_percent_of_the_best_gain():
    logits, labels = recorded()
    p = choose_policy(logits, labels)
    # best subset: original + hflip, +10 images (the zooms only break); 90% = 9 images. The 10 images hflip
    # fixes are the 10 least confident, so escalating the 9 least confident keeps 9: 1 + 9/100 views per image.
    assert p.best_views == ("original", "hflip") and p.best_gain_top1 == pytest.approx(10.0)
    assert (p.mode, p.views) == ("selective", ("original", "hflip"))
    assert p.escalated == pytest.approx(0.09) and p.mean_views == pytest.approx(1.09)
    assert p.gain_top1 == pytest.approx(9.0) and p.images == 100
    # the threshold really splits there: exactly 9 images fall below it
    assert int((gate_scores(logits["original"], p.gate) < p.threshold).sum()) == 9
    # the curve for the best subset ends at every image escalated, with the whole gain
    end = p.curves[p.gate][-1]
    assert end["mean_views"] == pytest.approx(2.0) and end["top1"] == pytest.approx(90.0)


def test_a_gate_that_cannot_tell_sends_every_image_through_all_views():
    logits, labels = recorded()
    flat = {v: lg.copy() for v, lg in logits.items()}
    flat["original"] = onehot_logits(flat["original"].argmax(1), 5, np.full(100, 1.0, np.float32))  # equal confidence
    flat["hflip"] = onehot_logits(flat["hflip"].argmax(1), 5, np.where(np.arange(100) < 10, 2.0, 1.0).astype(np.float32))
    p = choose_policy(flat, labels)
    assert p.mode == "all" and p.views == ("original", "hflip") and p.mean_views == pytest.approx(2.0)


def test_apply_policy_runs_the_originals_then_only_the_uncertain_images_extra_views():
    calls = []
    w = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)

    def run(x):
        calls.append(len(x))
        return x.reshape(len(x), -1) @ w

    def make_views(x, views):  # stand-in for serving.tta.make_views: image-major, one flipped copy per view
        return np.concatenate([np.stack([x[i][..., ::-1] for _ in views]) for i in range(len(x))])

    x = np.random.default_rng(1).standard_normal((6, 1, 3, 4)).astype(np.float32)
    thr = float(np.median(gate_scores(run(x), "max_prob")))  # half the images below it
    policy = TTAPolicy("selective", ("original", "hflip", "scale:0.9"), gate="max_prob", threshold=thr)
    esc = policy.escalate(run(x))
    calls.clear()
    out, used = apply_policy(policy, run, x, make_views)
    assert calls == [6, 2 * int(esc.sum())]  # one call for all originals, one for the escalated images' 2 views
    assert used.tolist() == [3 if e else 1 for e in esc] and 0 < esc.sum() < 6
    base, flipped = run(x), run(x[..., ::-1])
    expect = np.where(esc[:, None], (base + 2 * flipped) / 3, base)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    assert TTAPolicy.from_dict(policy.to_dict()) == policy
