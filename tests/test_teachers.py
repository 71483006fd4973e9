"""Ensemble and TTA teachers: the logits the student learns from, and the distillation loss on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deploykit.teachers import EnsembleTeacher, TTATeacher  # noqa: E402
from deploykit.training import kd_loss  # noqa: E402


def linear(weights) -> torch.nn.Module:
    m = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weights, dtype=torch.float32))
    return m


def test_ensemble_teacher_loss_equals_the_hand_computed_value():
    # two teachers on one input x = (1, 2): logits (1, 0, 2) and (3, 2, 0); their mean (2, 1, 1)
    a = linear([[1, 0], [0, 0], [0, 1]])
    b = linear([[1, 1], [0, 1], [0, 0]])
    x = torch.tensor([[1.0, 2.0]])
    teacher = EnsembleTeacher([a, b])
    assert teacher(x).tolist() == [[2.0, 1.0, 1.0]]
    student = torch.tensor([[0.0, 1.0, 0.0]])
    T, alpha, eps = 2.0, 0.7, 0.1
    loss = kd_loss(student, teacher(x), torch.tensor([0]), alpha=alpha, temperature=T, label_smoothing=eps)

    def softmax(v):
        e = [math.exp(u) for u in v]
        return [u / sum(e) for u in e]

    p_t, p_s = softmax([2 / T, 1 / T, 1 / T]), softmax([0, 1 / T, 0])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    log_q = [math.log(q) for q in softmax([0, 1, 0])]
    target = [1 - eps + eps / 3, eps / 3, eps / 3]                 # label 0 with smoothing over 3 classes
    ce = -sum(t * lq for t, lq in zip(target, log_q))
    assert float(loss) == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-6)


def test_tta_teacher_makes_the_services_views():
    from deploykit.serving.tta import average_logits, make_views

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1 * 12 * 10, 4)).eval()
    views = ("original", "hflip", "scale:0.9", "scale:1.1")
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 10)).astype(np.float32)
    with torch.inference_mode():
        got = TTATeacher(model, views)(torch.from_numpy(x)).numpy()
        want = average_logits(model(torch.from_numpy(make_views(x, views))).numpy(), len(views))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 matmul order: ~1e-7 apart
