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


SYNTH_BATCH = 16  # inputs optimised together (see batch_size below)


def synthesize_from_bn(model, input_size: tuple[int, int, int], n: int = 32, steps: int = 30, lr: float = 0.25,
                       batch_size: int = SYNTH_BATCH, seed: int = 0, bf16: bool = False, progress=None) -> np.ndarray:
    """Return ``n`` float32 inputs (already 'normalized' space) whose BN statistics match the model's.

    Args:
        bf16: run the forward/backward passes under BF16 autocast (the statistics and the inputs stay FP32). Only
            worth it where the CPU computes BF16 natively (AMX / AVX512-BF16): there ResNet-50 steps took 0.62 s vs
            1.38 s in FP32 (batch 16, channels_last); elsewhere BF16 is emulated and slower.
        batch_size: inputs optimised together; 16 was cheaper per image than 48 on 2 cores (38.6 vs 46.2 ms per
            image and step, ResNet-50 224, BF16), as the activations of a larger batch leave the caches.
        progress: called once per optimisation step.
    """
    import torch

    from ..stop import check_stop

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None]
    gen = torch.Generator().manual_seed(seed)
    if not bns or steps == 0:  # nothing to match (e.g. a fused or BN-free model): plain Gaussian inputs
        return torch.randn((n, *input_size), generator=gen).numpy()
    model = model.eval()
    losses: list = []

    def hook(module, inputs, _output):
        a = inputs[0]
        if a.shape[-1] >= 14 and a.shape[-2] >= 14:
            # every other row and column: a quarter of the pixels still gives each channel thousands of samples,
            # and the statistics were the dearest part of a step (ResNet-50 BF16: 1.96 -> 1.21 s per step)
            a = a[:, :, ::2, ::2]
        a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).float()  # (pixels, channels); FP32 even under autocast
        mean = a.mean(0)
        var = (a - mean).square().mean(0)
        losses.append(torch.norm(mean - module.running_mean) + torch.norm(var.add(1e-5).sqrt()
                                                                          - module.running_var.add(1e-5).sqrt()))

    handles = [m.register_forward_hook(hook) for m in bns]
    params = [p.requires_grad_(False) for p in model.parameters()]
    # channels_last: the layout oneDNN's convolutions prefer on CPU (1.38 vs 1.66 s per ResNet-50 step in FP32)
    model = model.to(memory_format=torch.channels_last)
    out = []
    try:
        for start in range(0, n, batch_size):
            x = torch.randn((min(batch_size, n - start), *input_size), generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                check_stop()
                losses.clear()
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model(x.contiguous(memory_format=torch.channels_last))
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
        model.to(memory_format=torch.contiguous_format)
    return torch.cat(out).numpy().astype(np.float32)


def native_bf16() -> bool:
    """Does this CPU compute BF16 natively (AMX or AVX512-BF16), so BF16 autocast is faster, not emulated?"""
    from ..environment import has_cpu_flag

    return has_cpu_flag("amx_bf16", "avx512_bf16")
