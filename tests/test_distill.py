"""Distillation trainer: the loss equals a hand computation; a short real run learns, resumes, and runs under DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.preprocessing import Preprocessing
from deploykit.training import (DistillConfig, data_prior_weights, effective_number_weights, epoch_order, fit_distill,
                                kd_loss, stratified_split)

PRE = Preprocessing(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_kd_loss_equals_hand_computation():
    s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = np.array([[1.5, 1.0, -0.5], [-1.0, 2.0, 0.0]])
    y = np.array([0, 2])
    alpha, T, eps = 0.7, 4.0, 0.1
    ps, pt = _softmax(s / T), _softmax(t / T)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    logp = np.log(_softmax(s))
    k = s.shape[1]
    target = np.full_like(s, eps / k)
    target[np.arange(2), y] += 1 - eps
    ce = np.mean(-np.sum(target * logp, axis=1))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=alpha, temperature=T, label_smoothing=eps)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # alpha = 0 is plain smoothed CE; identical logits give zero KL
    assert float(kd_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), alpha=1.0, temperature=T)) == \
        pytest.approx(0.0, abs=1e-7)


def test_effective_number_weights_match_cui_et_al():
    w = effective_number_weights([1000, 100, 10], beta=0.99)
    raw = np.array([(1 - 0.99) / (1 - 0.99 ** n) for n in (1000, 100, 10)])
    np.testing.assert_allclose(w, raw / raw.sum() * 3, rtol=1e-6)
    assert w[2] > w[1] > w[0]


def test_split_is_stratified_and_balanced_sampler_evens_classes():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    tr, va = stratified_split(labels, 0.1, seed=0)
    assert not set(tr) & set(va) and len(tr) + len(va) == 1000
    assert list(np.bincount(labels[va])) == [90, 9, 1]
    drawn = np.bincount(labels[epoch_order(labels, epoch=0, seed=0, balanced=True)], minlength=3)
    assert all(abs(d / 1000 - 1 / 3) < 0.06 for d in drawn)          # ~1/3 each, not 90/9/1 %
    assert np.array_equal(epoch_order(labels, 3, 0, False), epoch_order(labels, 3, 0, False))  # same on every rank


def test_balanced_transfer_label_loss_has_the_data_priors_expectation():
    """transfer: balanced draws every class equally; the label loss, weighted by data_prior_weights, must still
    average to the loss on the data's own class mix (exact: a ratio of two sums over classes)."""
    counts = np.array([900, 90, 10, 0])                      # a class absent from the train split gets weight 0
    per_class_loss = np.array([0.2, 1.3, 2.9, 7.0])
    w = data_prior_weights(counts)
    present = counts > 0
    balanced = np.where(present, 1.0 / present.sum(), 0.0)   # p_balanced(c)
    weighted_mean = np.sum(balanced * w * per_class_loss) / np.sum(balanced * w)
    assert weighted_mean == pytest.approx(np.sum(counts * per_class_loss) / counts.sum(), rel=1e-6)
    np.testing.assert_allclose(w, [2.7, 0.27, 0.03, 0.0], rtol=1e-6)


class TinyNet(torch.nn.Module):
    """No BatchNorm: so that 2 DDP processes and 1 process are the same computation."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
        self.fc = torch.nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def _fmnist(n=1200, seed=0):
    from deploykit.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("train").head(n, seed=seed)


def _teacher():
    """A quickly trained teacher, so that KD has something to teach."""
    torch.manual_seed(0)
    t = TinyNet(width=16)
    cfg = DistillConfig(epochs=2, batch_size=32, alpha=0.0, lr=3e-3, progress=False, resume=False, bf16=False, threads=1,
                        ema_decay=0)
    t, _ = fit_distill(t, TinyNet(width=16), _fmnist(), PRE, cfg)
    return t


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


def test_short_distillation_learns_from_the_teacher_and_resumes(teacher, tmp_path):
    data = _fmnist()
    torch.manual_seed(1)
    cfg = DistillConfig(epochs=2, batch_size=32, lr=3e-3, progress=False, cache_dir=str(tmp_path), bf16=True, threads=1,
                        patience=5, ema_decay=0.99)
    student, res = fit_distill(TinyNet(), teacher, data, PRE, cfg)
    assert res.history[-1]["val_top1"] > 40            # 10 classes: chance is 10%; the teacher has ~60%
    assert res.best["macro_f1"] == max(h["val_macro_f1"] for h in res.history)
    assert len(res.val_indices) == 120 and res.train_images == 1080
    # a second call with the same inputs resumes from the cached last epoch and returns the same weights
    torch.manual_seed(1)
    again, res2 = fit_distill(TinyNet(), teacher, data, PRE, cfg)
    assert res2.resumed_from == 2 and res2.history == res.history
    for a, b in zip(student.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


DDP_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_distill import TinyNet, PRE, _fmnist
from deploykit.training import DistillConfig, fit_distill
torch.manual_seed(0)
teacher = TinyNet(width=16)
torch.manual_seed(1)
student = TinyNet()
cfg = DistillConfig(epochs=1, batch_size=32, lr=3e-3, bf16=False, progress=False, resume=False, augment=False, threads=1)
model, res = fit_distill(student, teacher, _fmnist(400), PRE, cfg)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(model.state_dict(), {out!r})
    print(json.dumps({{"world": res.world_size, "top1": res.best["top1"]}}))
"""


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) takes the same steps as one process, within float tolerance."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}.pth"
        script = tmp_path / f"run{n}.py"
        script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + n), str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["world"] == n
        results[n] = torch.load(out, weights_only=True)
    for k in results[1]:
        assert torch.allclose(results[1][k], results[2][k], atol=1e-5, rtol=1e-4), k


def test_a_returned_ema_model_can_be_trained_again(teacher, tmp_path):
    """distill -> qat: the first fit returns the EMA model with gradients off; the second fit must still train it."""
    torch.manual_seed(2)
    frozen = TinyNet()
    frozen.requires_grad_(False)
    before = [p.detach().clone() for p in frozen.parameters()]
    cfg = DistillConfig(epochs=1, batch_size=32, lr=3e-3, progress=False, resume=False, threads=1, ema_decay=0,
                        max_train_images=256)
    trained, _ = fit_distill(frozen, teacher, _fmnist(400), PRE, cfg)
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
