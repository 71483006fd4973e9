"""What pruning a block costs the model's *outputs*: the latency allocation's accuracy side.

The latency sweep (``deploykit.prune_latency``) prunes one block at a time and needs, beside the time each block
buys, what each costs. Weight mass (the L2 criterion the pruner ranks channels by) is a poor stand-in across
blocks: on the 64x64 long-tailed EfficientNet-Lite0, ``blocks.1`` holds 3% of the mass and ``blocks.5`` 26%, yet
pruning half of ``blocks.1`` moved the outputs 8x more than half of ``blocks.5`` (class-balanced KL 0.25 vs 0.03 on
256 training images; top-1 on 2,000 test images before any fine-tuning 70.3 vs 85.0; docs/decisions.md). So the
cost is measured: the pruned copy's BatchNorm statistics are re-estimated on the calibration images (a pruned
block's old statistics describe channels that are gone; EagleEye, Li et al. ECCV 2020, found accuracy after this
"adaptive BN" ranks pruned candidates the way fine-tuned accuracy does), then the KL divergence of its softmax from
the unpruned model's is averaged over the same images, **each class (the unpruned model's prediction) weighing the
same**: on long-tailed data the minority classes are what a pruned model loses first and what macro-F1 counts.
What it did and did not buy end to end (on the Lite0: a target reached where weight mass overshot it; no accuracy
gained at 0.5x) is in docs/decisions.md.

Example:
    >>> cost = OutputSensitivity(model, calibration_images)
    >>> cost(pruned_copy)        # 0.0 for an unchanged model; larger = the outputs moved more
"""

from __future__ import annotations

import copy

import numpy as np

# Images the cost is measured on: at 64x64 a Lite0 block costs ~2 s for both passes on 2 cores; a 224x224 ResNet-50
# ~10 s, times its 16 blocks. More images steady the estimate of the rare classes only slowly (1/count weights).
MAX_IMAGES = 256
_BATCH = 64


class OutputSensitivity:
    """Class-balanced KL(unpruned || pruned) on ``images``, after re-estimating the pruned model's BN statistics."""

    def __init__(self, model, images: np.ndarray, max_images: int = MAX_IMAGES):
        import torch

        self.x = torch.from_numpy(np.ascontiguousarray(images[:max_images], dtype=np.float32))
        # the reference goes through the same re-estimation, so what is measured is the pruning alone (an unpruned
        # copy costs exactly 0), not also the difference between these images' statistics and the training set's
        ref = self._adapted_logits(model)
        self.log_p = torch.log_softmax(ref, dim=1)
        pred = ref.argmax(dim=1)
        counts = torch.bincount(pred, minlength=ref.shape[1]).double()
        w = 1.0 / counts[pred]
        self.weights = w / w.sum()

    @staticmethod
    def adapt_bn(model, x) -> None:
        """Re-estimate every BatchNorm's running statistics on ``x`` (a cumulative average, not a momentum one);
        ``model`` is left in eval mode."""
        import torch

        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        model.eval()
        for bn in bns:   # only the statistics: dropout / drop-path stay off while they are gathered
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        if bns:
            with torch.no_grad():   # inference_mode would refuse the in-place update of the running statistics
                for i in range(0, len(x), _BATCH):
                    model(x[i:i + _BATCH])
            model.eval()

    def _adapted_logits(self, model):
        """Logits of a copy of ``model`` with its BN statistics re-estimated (the caller's model keeps its own)."""
        import torch

        trial = copy.deepcopy(model)
        self.adapt_bn(trial, self.x)
        with torch.inference_mode():
            return torch.cat([trial(self.x[i:i + _BATCH]) for i in range(0, len(self.x), _BATCH)]).double()

    def __call__(self, pruned) -> float:
        """The cost of ``pruned`` (left untouched: its BN statistics are re-estimated on a copy)."""
        import torch

        log_q = torch.log_softmax(self._adapted_logits(pruned), dim=1)
        kl = (self.log_p.exp() * (self.log_p - log_q)).sum(dim=1)
        return max(0.0, float((kl * self.weights).sum()))
