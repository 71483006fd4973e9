"""What pruning a block costs the outputs (the accuracy side of the latency allocation): exact on constructed
logits, and on the real long-tailed Lite0 reference the ranking weight mass gets wrong."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.prune_sensitivity import OutputSensitivity

ROOT = Path(__file__).resolve().parents[1]


class Lookup(torch.nn.Module):
    """Logits looked up by the image's index (written into its first pixel): outputs chosen exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def _images(n: int) -> np.ndarray:
    x = np.zeros((n, 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def _kl(p_logits, q_logits) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), 0), torch.log_softmax(q_logits.double(), 0)
    return float((lp.exp() * (lp - lq)).sum())


def test_every_predicted_class_weighs_the_same():
    """9 images the model calls class 0, 1 it calls class 1: moving only the minority image's outputs costs half
    its KL (its class is half the weight), not a tenth (its share of the images)."""
    table = torch.tensor([[4.0, 0.0, 0.0]] * 9 + [[0.0, 3.0, 0.0]])
    x = _images(10)
    cost = OutputSensitivity(Lookup(table), x)
    moved = table.clone()
    moved[9] = torch.tensor([0.0, 1.0, 1.5])
    assert cost(Lookup(moved)) == pytest.approx(0.5 * _kl(table[9], moved[9]), rel=1e-9)
    moved = table.clone()
    moved[:9] = torch.tensor([2.0, 1.0, 0.0])           # every majority image moved the same way
    assert cost(Lookup(moved)) == pytest.approx(0.5 * _kl(table[0], moved[0]), rel=1e-9)
    assert cost(Lookup(table)) == 0.0


def test_statistics_are_re_estimated_on_a_copy_and_an_unpruned_copy_costs_nothing():
    """A model whose BN statistics do not describe these images (as a pruned block's no longer do): the cost
    compares both after re-estimation, so an unchanged copy costs exactly 0 and the caller's model is untouched."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    model[1].running_mean.fill_(5.0)                    # stale statistics
    before = copy.deepcopy(model.state_dict())
    x = np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)
    cost = OutputSensitivity(model, x)
    assert cost(copy.deepcopy(model)) == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training
    # the same weights with the stale mean corrected by hand: statistics are not what the cost sees
    fixed = copy.deepcopy(model)
    fixed[1].running_mean.zero_()
    assert cost(fixed) == 0.0
    halved = copy.deepcopy(model)
    with torch.no_grad():
        halved[0].weight[4:] = 0                        # half the channels gone
    assert cost(halved) > 1e-3


def test_on_the_long_tailed_lite0_a_light_block_costs_more_than_a_heavy_one():
    """The case weight mass gets wrong (recorded in docs/decisions.md): half of blocks.1 is 3% of the L2 mass and
    half of blocks.5 is 26%, but blocks.1 moves the outputs far more (KL 0.25 vs 0.03 measured on 256 images;
    asserted with a 3x margin, well inside the 8x measured, so any x86-64 CPU's float rounding passes)."""
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    from deploykit.checkpoint import load_checkpoint
    from deploykit.data.fashion_mnist import available, load_fashion_mnist
    from deploykit.preprocessing import resolve_preprocessing
    from deploykit.prune_latency import weight_mass
    from deploykit.stages.prune import _prune_once

    if not available():
        pytest.skip("Fashion-MNIST is not installed")
    loaded = load_checkpoint(ROOT / "models" / "efficientnet_lite0_fmnist_lt64.pth")
    pre, model = resolve_preprocessing(loaded), loaded.model.eval()
    train = load_fashion_mnist("train", long_tailed=True)
    x = pre.from_uint8(train.images[np.random.default_rng(1).permutation(len(train))[:160]])
    cost, mass0 = OutputSensitivity(model, x), weight_mass(model)
    got = {}
    for unit in ("blocks.1", "blocks.5"):
        pruned = copy.deepcopy(model)
        _prune_once(pruned, (3, 64, 64), {dict(pruned.named_modules())[unit]: 0.5}, 8, [], "l2", False)
        got[unit] = (cost(pruned), 1 - weight_mass(pruned) / mass0)
    assert got["blocks.1"][1] < got["blocks.5"][1] / 4         # mass says blocks.1 is cheap ...
    assert got["blocks.1"][0] > 3 * got["blocks.5"][0]         # ... the outputs say it is not
