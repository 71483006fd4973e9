"""Shared test helpers (plain functions; pytest puts tests/ on sys.path)."""

import struct
import zlib


def randomize_bn(model):
    """Spread-out, seeded BN statistics: a wrong fold or kernel then shows as a large logit difference."""
    import torch

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb's header) with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save_tiny_checkpoint(path, num_classes: int = 10):
    """A seeded random-weight timm resnet10t (8-64 channels, 1x28x28) saved in timm train.py format."""
    import timm
    import torch

    from deploykit.checkpoint import save_timm_checkpoint

    torch.manual_seed(0)
    kwargs = {"channels": (8, 16, 32, 64)}
    model = timm.create_model("resnet10t", num_classes=num_classes, in_chans=1, **kwargs)
    save_timm_checkpoint(path, arch="resnet10t", state_dict=model.state_dict(),
                         args={"model": "resnet10t", "num_classes": num_classes, "in_chans": 1,
                               "input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "model_kwargs": kwargs})
    return path


def margin_agreement(ref_logits, test_logits, tol=None) -> dict:
    """Top-1 agreement of ``test_logits`` with ``ref_logits`` on the inputs the reference decides clearly.

    An input is *decided* when the reference's top-two logit gap exceeds twice the logit error ``tol``:
    ``None``, the measured max abs difference over all inputs; ``"per_input"``, each input's own max abs
    difference (one outlier input then does not make every other input undecided: INT8 errors have a long
    tail); a number, an error the comparison is expected to stay within. A perturbation of at most ``tol`` per
    logit cannot flip a decided input, so agreement on decided inputs must be 100%; near-ties (a random
    network's top-two logits can be closer than INT8 or kernel rounding) are left out instead of counted.
    """
    import numpy as np

    ref = np.asarray(ref_logits, np.float64)
    got = np.asarray(test_logits, np.float64)
    assert ref.shape == got.shape and ref.ndim == 2 and ref.shape[1] >= 2, (ref.shape, got.shape)
    row_err = np.abs(ref - got).max(1)
    err = float(row_err.max())
    if tol is None:
        tol = err
    elif isinstance(tol, str):
        assert tol == "per_input", tol
        tol = row_err
    top2 = np.sort(ref, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    decided = gap > 2 * np.asarray(tol, np.float64)
    agree = ref.argmax(1) == got.argmax(1)
    return {"inputs": len(ref), "decided": int(decided.sum()), "agree_decided": int((agree & decided).sum()),
            "agree_all": int(agree.sum()), "max_abs_err": err, "median_gap": float(np.median(gap))}


def assert_margin_agreement(ref_logits, test_logits, min_decided: int, tol=None) -> dict:
    """Assert 100% top-1 agreement on the decided inputs (see ``margin_agreement``) and that at least
    ``min_decided`` inputs are decided; returns the counts.

    With a measured ``tol`` (``None`` or ``"per_input"``) agreement on decided inputs follows from the
    definition; what can fail, and what carries the check, is ``min_decided``: the error must stay below half
    the decision margin on that many inputs. A wrong scale, a swapped layout or a bf16 fallback inflates the
    error past most margins and fails it; a near-tie flip does not. With a numeric ``tol`` (an error bound the
    comparison is expected to meet) the agreement half bites as well.
    """
    m = margin_agreement(ref_logits, test_logits, tol)
    assert m["decided"] >= min_decided, f"only {m['decided']} of {m['inputs']} inputs decided (need {min_decided}): {m}"
    assert m["agree_decided"] == m["decided"], f"top-1 flipped on decided inputs: {m}"
    return m
