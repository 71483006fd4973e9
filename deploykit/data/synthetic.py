"""Data-free calibration inputs synthesized from a model's own BatchNorm statistics (ZeroQ, Cai et al. 2020).

Starting from Gaussian noise, the inputs are optimised so that, at every BatchNorm layer, the batch
mean/std of the incoming activations match the layer's running mean/std. The result activates the
network like real data does, which is what calibration needs, without a single real image.

Example:
    >>> x = synthesize_from_bn(model, (3, 224, 224), n=32, steps=20)
    >>> x.shape
    (32, 3, 224, 224)
"""

from __future__ import annotations

import numpy as np


def synthesize_from_bn(model, input_size: tuple[int, int, int], n: int = 32, steps: int = 30, lr: float = 0.25,
                       batch_size: int = 16, seed: int = 0, progress=None) -> np.ndarray:
    """Return ``n`` float32 inputs (already 'normalized' space) whose BN statistics match the model's."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None]
    gen = torch.Generator().manual_seed(seed)
    if not bns:  # nothing to match (e.g. a fused or BN-free model): plain Gaussian inputs
        return torch.randn((n, *input_size), generator=gen).numpy()
    model = model.eval()
    losses: list = []

    def hook(module, inputs, _output):
        a = inputs[0]
        mean, var = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)
        losses.append(torch.norm(mean - module.running_mean) + torch.norm(var.add(1e-5).sqrt()
                                                                          - module.running_var.add(1e-5).sqrt()))

    handles = [m.register_forward_hook(hook) for m in bns]
    params = [p.requires_grad_(False) for p in model.parameters()]
    out = []
    try:
        for start in range(0, n, batch_size):
            x = torch.randn((min(batch_size, n - start), *input_size), generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                losses.clear()
                opt.zero_grad(set_to_none=True)
                model(x)
                torch.stack(losses).sum().backward()
                opt.step()
                if progress:
                    progress()
            out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    return torch.cat(out).numpy().astype(np.float32)
