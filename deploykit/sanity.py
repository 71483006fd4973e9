"""Quick checks on what the user brought, run before any heavy stage: cheap, and each says what to do.

Example:
    >>> note = ema_vs_model(loaded, data, preprocessing)   # None when the EMA weights look fine
"""

from __future__ import annotations

import copy

import numpy as np

# An EMA that never warmed up (decay too high for the run's length) scored 9.5% where its model weights scored
# 83.7% on a user's 44-class task; a few points between the two are normal.
EMA_GAP_POINTS = 10.0


def ema_vs_model(loaded, data, pre, images: int = 128) -> str | None:
    """When EMA weights were chosen and the file also holds model weights, compare both on labelled training
    images; a warning when the EMA is far worse (``--weights model`` then uses the other set)."""
    import torch

    if loaded.alternative is None or data is None:
        return None
    kind, state = loaded.alternative
    subset = data.calibration.head(images, seed=7)
    x = torch.from_numpy(subset.load(pre, np.arange(len(subset))))
    other = copy.deepcopy(loaded.model)
    other.load_state_dict(state, strict=False)
    with torch.inference_mode():
        top1 = {name: float((m.eval()(x).argmax(1).numpy() == subset.labels).mean() * 100)
                for name, m in (("ema", loaded.model), (kind, other))}
    if top1["ema"] < top1[kind] - EMA_GAP_POINTS:
        return (f"the EMA weights score {top1['ema']:.1f}% but the {kind} weights {top1[kind]:.1f}% on {len(subset)} "
                f"training images: the EMA may never have warmed up; pass --weights {kind} to use the other set")
    return None
