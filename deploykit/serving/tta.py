"""Test-time augmentation as pure numpy/Pillow: views of preprocessed inputs, and their logits averaged.

All views of all images are stacked into one array, so one ``backend.run`` call scores them together
(one batched call costs far less than one call per view on a CPU).

Example:
    >>> x = pre.from_pil(img)                                   # (1, C, H, W)
    >>> views = parse_views("original,hflip,scale:0.9,scale:1.1")
    >>> logits = average_logits(backend.run(make_views(x, views)), len(views))   # (1, classes)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import DeployKitError

DEFAULT_VIEWS = ("original", "hflip", "scale:0.9", "scale:1.1")


def parse_views(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate a view list ("original,hflip,scale:0.9" or a sequence); "none"/"" means the original only.

    Example:
        >>> parse_views("hflip, scale:1.1")
        ('original', 'hflip', 'scale:1.1')
    """
    if spec is None:
        return DEFAULT_VIEWS
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items or items == ["none"]:
        return ("original",)
    out: list[str] = []
    for item in items:
        if item in ("original", "hflip"):
            pass
        elif item.startswith("scale:"):
            try:
                s = float(item.split(":", 1)[1])
            except ValueError:
                s = -1.0
            if not 0.5 <= s <= 2.0:
                raise DeployKitError(f"TTA view {item!r} needs a scale between 0.5 and 2.0",
                                     fix="write e.g. scale:0.9 or scale:1.1")
            item = f"scale:{s:g}"
        else:
            raise DeployKitError(f"unknown TTA view {item!r}", fix="use original, hflip or scale:<factor>")
        if item not in out:
            out.append(item)
    if "original" in out:  # the original always comes first: views[0] is what tta=false would score
        out.remove("original")
    return ("original", *out)


# Below this side length a zoom is two small matrix products (0.04 ms at 28x28, vs 0.6 ms through Pillow
# channel by channel); above it the dense operator costs more than Pillow's banded resize.
MATRIX_MAX_SIDE = 96


@lru_cache(maxsize=64)
def _zoom_matrix(n: int, scale: float) -> np.ndarray:
    """(n, n) operator of a 1-D zoom about the centre: Pillow's bilinear resize to round(n*scale), then
    centre crop (scale > 1) or edge padding (scale < 1). Built by resizing the identity with Pillow, so
    it equals Pillow's separable resize (to float rounding)."""
    from PIL import Image

    eye = np.eye(n, dtype=np.float32)
    m = max(1, round(n * scale))
    resized = np.asarray(Image.fromarray(eye, "F").resize((m, n), Image.BILINEAR), dtype=np.float32)  # (n, m)
    return np.ascontiguousarray(resized[:, _crop_or_pad(n, m)].T)  # (n out, n in)


def _crop_or_pad(n: int, m: int) -> np.ndarray:
    """Indices into a length-m resized axis giving n pixels: centre crop, or centre + repeated border."""
    if m >= n:
        start = (m - n) // 2
        return np.arange(start, start + n)
    # zoom out: the frame repeats the border pixel (black for Fashion-MNIST, the edge colour for photos),
    # not a constant the model never saw
    return np.clip(np.arange(n) - (n - m) // 2, 0, m - 1)


def rescale(x: np.ndarray, scale: float) -> np.ndarray:
    """Zoom (..., H, W) float images about their centre, keeping (H, W): crop when scale > 1, edge-pad when < 1.

    Bilinear resampling is linear, so zooming a normalized input equals normalizing the zoomed pixels.
    """
    x = np.asarray(x, np.float32)
    h, w = x.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return x.copy()
    if max(h, w) <= MATRIX_MAX_SIDE:
        return (_zoom_matrix(h, float(scale)) @ x @ _zoom_matrix(w, float(scale)).T).astype(np.float32, copy=False)
    from PIL import Image

    flat = x.reshape(-1, h, w)
    rows, cols = _crop_or_pad(h, nh), _crop_or_pad(w, nw)
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), "F").resize((nw, nh), Image.BILINEAR),
                               dtype=np.float32)[rows][:, cols] for ch in flat])
    return out.reshape(x.shape)


def make_views(x: np.ndarray, views: Sequence[str] = DEFAULT_VIEWS) -> np.ndarray:
    """(N,C,H,W) preprocessed inputs -> (N*V,C,H,W), image-major: rows i*V .. i*V+V-1 are image i's views."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected NCHW input, got shape {x.shape}")
    out = np.empty((x.shape[0], len(views), *x.shape[1:]), np.float32)
    for j, view in enumerate(views):
        if view == "original":
            out[:, j] = x
        elif view == "hflip":
            out[:, j] = x[..., ::-1]
        else:
            out[:, j] = rescale(x, float(view.split(":", 1)[1]))
    return out.reshape(-1, *x.shape[1:])


def average_logits(logits: np.ndarray, n_views: int) -> np.ndarray:
    """(N*V, K) logits in make_views order -> (N, K) mean over each image's views."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.shape[0] % n_views:
        raise ValueError(f"{logits.shape[0]} rows is not a multiple of {n_views} views")
    return logits.reshape(-1, n_views, logits.shape[-1]).mean(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[dict]:
    """One image's probabilities -> the k best as [{"label", "index", "probability"}], best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": class_names[i] if i < len(class_names) else str(i), "index": int(i),
             "probability": float(probabilities[i])} for i in order]


def predict(backend, x: np.ndarray, views: Sequence[str], k: int, class_names: Sequence[str],
            policy=None) -> list[dict]:
    """Score N preprocessed images with TTA; the same path the service takes.

    Without ``policy``: every view of every image in ONE backend call. With a ``deploykit.tta_policy.TTAPolicy``
    (the artifact's ``tta_policy``): the originals in one call, the extra views of the images its gate calls
    uncertain in a second (``views`` is then ignored).

    Returns:
        per image {"predictions": top_k list, "tta_views": views used for that image}.
    """
    if policy is not None:
        from ..tta_policy import apply_policy

        logits, used = apply_policy(policy, backend.run, x, make_views)
    else:
        logits = average_logits(backend.run(make_views(x, views)), len(views))
        used = np.full(len(x), len(views))
    return [{"predictions": top_k(p, k, class_names), "tta_views": int(v)} for p, v in zip(softmax(logits), used)]
